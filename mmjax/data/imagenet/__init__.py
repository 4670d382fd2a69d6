"""ImageNet-1k class names and CLIP's 80 prompt templates, for zero-shot
classification (`configs/zero_shot_imagenet.py`).

  from mmjax.data import imagenet
  imagenet.class_names()  # ("tench", "goldfish", ...): 1000, label order
  imagenet.templates()    # ("a bad photo of a {}.", ...): 80

Both are data files next to this module (package data), copied from OpenAI's
CLIP repository (MIT licence); see PROVENANCE.md. Importing this module
imports neither jax nor tfds.
"""

import functools
import pathlib

_DIR = pathlib.Path(__file__).parent
NUM_CLASSES, NUM_TEMPLATES = 1000, 80


def _lines(name: str) -> tuple[str, ...]:
  return tuple((_DIR / name).read_text(encoding="utf-8").splitlines())


@functools.cache
def class_names() -> tuple[str, ...]:
  """CLIP's 1000 ImageNet class names; index k is label k of tfds
  imagenet2012 and imagenet_v2. Two names repeat, as in CLIP ("missile",
  "sunglasses"; PROVENANCE.md)."""
  names = _lines("classes.txt")
  assert len(names) == NUM_CLASSES, f"classes.txt has {len(names)} lines"
  return names


@functools.cache
def templates() -> tuple[str, ...]:
  """CLIP's 80 ImageNet prompt templates, each with one "{}" for the class
  name ("a bad photo of a {}.")."""
  lines = _lines("templates.txt")
  assert len(lines) == NUM_TEMPLATES, f"templates.txt has {len(lines)} lines"
  assert all(t.count("{}") == 1 for t in lines), "a template without {}"
  return lines
