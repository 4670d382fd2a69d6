"""Local tfds builders for mmjax's datasets (array_record, no TensorFlow).

  from mmjax.data.builders import get_builder
  builder = get_builder("avmnist", data_dir="/tmp/tfds")   # built if needed
  train = builder.as_data_source()["train"]                # random access
  example = train[0]   # {"image": uint8 [28,28,1], "audio": ..., "label": int}

Names: "mnist", "fsdd", "avmnist" (= its default config, "avmnist/noisy"),
"avmnist/clean", "coco_mini" (86 CC BY / CC BY-SA COCO photos, 64x64, with 5
human captions each; splits train 66 / test 20; captions come back as a numpy
object array of 5 UTF-8 `bytes`), "digits_qa" (= "digits_qa/default": questions
about a 2x2 grid of MNIST digits and a spoken FSDD digit, image-only,
audio-only and audio+image families; splits train 20,000 / val 1,000 / test
2,000 / test_compositional 1,000, the last holding the family x digit
combinations kept out of the others). The builders read the repo's compact
copies in data/ (`DEFAULT_SOURCE_DIR`) or another `source_dir` with the same
layout; they never download. They are not in tfds's registry (tfds has its own
"mnist"); this module's `BUILDERS` is the name table.
"""

from __future__ import annotations

import re

from mmjax.data.builders._common import DEFAULT_SOURCE_DIR
from mmjax.data.builders.avmnist import AVMNIST_SNR_DB, Avmnist, AvmnistConfig
from mmjax.data.builders.coco_mini import CocoMini
from mmjax.data.builders.digits_qa import DigitsQa, DigitsQaConfig
from mmjax.data.builders.fsdd import Fsdd
from mmjax.data.builders.mnist import Mnist
from mmjax.errors import UsageError

BUILDERS: dict[str, type] = {"mnist": Mnist, "fsdd": Fsdd, "avmnist": Avmnist,
                             "coco_mini": CocoMini, "digits_qa": DigitsQa}

FILE_FORMAT = "array_record"

__all__ = [
    "AVMNIST_SNR_DB", "Avmnist", "AvmnistConfig", "BUILDERS", "CocoMini",
    "DEFAULT_SOURCE_DIR", "DigitsQa", "DigitsQaConfig", "FILE_FORMAT", "Fsdd",
    "Mnist", "get_builder", "known_names",
]


def known_names() -> list[str]:
  """Every accepted name: each builder, and builder/config for each config."""
  names = []
  for name, cls in BUILDERS.items():
    names.append(name)
    for cfg in cls.BUILDER_CONFIGS or ():
      names.append(f"{name}/{getattr(cfg, 'short_name', cfg.name)}")
  return names


def _resolve(name: str):
  """'name' or 'name/config' -> (builder class, config name or None)."""
  base, _, cfg_name = name.strip().partition("/")
  cls = BUILDERS.get(base)
  if cls is not None and not cfg_name:
    return cls, None
  if cls is not None:
    for cfg in cls.BUILDER_CONFIGS or ():
      if cfg_name in (cfg.name, getattr(cfg, "short_name", None)):
        return cls, cfg.name
    snr = re.fullmatch(r"noisy_snr(m?\d+(?:p\d+)?)db", cfg_name)
    if cls is Avmnist and snr:  # any SNR, e.g. "avmnist/noisy_snrm10db"
      db = float(snr.group(1).replace("m", "-").replace("p", "."))
      return cls, AvmnistConfig(name="noisy", snr_db=db)
  raise UsageError(f"unknown dataset {name!r}; known: {', '.join(known_names())}"
                   " (and avmnist/noisy_snr<SNR>db for any SNR, m = minus)")


def get_builder(name: str, data_dir: str, source_dir: str | None = None):
  """Returns the builder for `name`, prepared in `data_dir` if not yet built.

  Args:
    name: "mnist", "fsdd", "avmnist", "avmnist/noisy", "avmnist/clean",
      "coco_mini", "digits_qa" (tfds-style "name/config"; the full config
      name, e.g. "avmnist/noisy_snr0db", works too).
    data_dir: where built datasets live (data_dir/<name>/<config>/<version>).
    source_dir: the raw sources (default: the repo's data/). Only read when
      the dataset must be built.

  Raises:
    UsageError: unknown name (the message lists the known names); missing
      source dir or file (names the path); corrupted or truncated source file
      (names the file).
  """
  cls, config = _resolve(name)
  kwargs = {"config": config} if config else {}
  builder = cls(data_dir=data_dir, source_dir=source_dir,
                file_format=FILE_FORMAT, **kwargs)
  if not builder.is_prepared():
    builder.check_source_dir()  # fail before tfds starts (and logs) a build
    builder.download_and_prepare(file_format=FILE_FORMAT)
  return builder
