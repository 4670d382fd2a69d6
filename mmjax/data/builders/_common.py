"""Shared pieces of the local tfds builders: the base class and source readers.

The builders never download: they read the compact copies in the repo's
`data/` (written by `tools/compact_data.py`) or in another `source_dir` with the
same layout. Every problem with a source file raises `mmjax.errors.UsageError`
with a one-line message that names the file.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import pathlib
import zipfile
from typing import Any

import numpy as np
import soundfile as sf
import tensorflow_datasets as tfds
from etils import epath

from mmjax.errors import UsageError

# The repo's data/ directory: mmjax/data/builders/_common.py -> <repo>/data.
DEFAULT_SOURCE_DIR = pathlib.Path(__file__).resolve().parents[3] / "data"

MNIST_FILE = "mnist/mnist.npz"
FSDD_INDEX = "fsdd/index.csv"
FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
FSDD_RATE = 8000
_MNIST_KEYS = ("x_train", "y_train", "x_test", "y_test")


def one_line(text: Any) -> str:
  """Collapses whitespace (and newlines) so error messages stay on one line."""
  return " ".join(str(text).split())


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A GeneratorBasedBuilder that reads a local source dir instead of downloading.

  Subclasses are defined with `skip_registration=True`, so they never enter
  (or collide with) tfds's global registry, where `mnist` already exists; the
  mmjax name table is `mmjax.data.builders.BUILDERS`.

  Records are written in generation order (`disable_shuffling=True`): record i
  of a split is example i, as documented per builder.
  """

  def __init__(self, *, source_dir: str | pathlib.Path | None = None,
               **kwargs: Any):
    self._source_dir = pathlib.Path(
        source_dir if source_dir is not None else DEFAULT_SOURCE_DIR)
    super().__init__(**kwargs)
    # tfds pickles builders as their constructor kwargs; keep ours too.
    self._original_state = dict(self._original_state,
                                source_dir=str(self._source_dir))

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds's own lookup goes through the optional `importlib_resources`
    # package (absent here); this is the fallback tfds uses when it can't.
    return epath.Path(inspect.getfile(cls))

  @property
  def source_dir(self) -> pathlib.Path:
    return self._source_dir

  def check_source_dir(self) -> None:
    """UsageError naming the source dir if it is not a directory."""
    if not self._source_dir.is_dir():
      raise UsageError(
          f"dataset source directory not found: {self._source_dir} "
          "(write it with: python tools/compact_data.py --shared <dir> --out data)")

  def source_path(self, relative: str) -> pathlib.Path:
    """`source_dir / relative`, or UsageError naming the missing path."""
    self.check_source_dir()
    path = self._source_dir / relative
    if not path.exists():
      raise UsageError(f"dataset source file not found: {path}")
    return path

  def _make_info(self, description: str, features: tfds.features.FeaturesDict,
                 **kwargs: Any) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=description, features=features,
        disable_shuffling=True, **kwargs)


def load_mnist(builder: LocalBuilder) -> dict[str, np.ndarray]:
  """x_train, y_train, x_test, y_test from `<source>/mnist/mnist.npz`, checked.

  The real file has 60,000 / 10,000 images; other sizes are accepted (tests
  build from subsets).
  """
  path = builder.source_path(MNIST_FILE)
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in _MNIST_KEYS}
  except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
    raise UsageError(f"cannot read MNIST file {path}: {one_line(e)}") from e
  for part in ("train", "test"):
    x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
    if (x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8
        or y.shape != x.shape[:1] or y.dtype != np.uint8 or len(y) == 0):
      raise UsageError(
          f"MNIST file {path}: x_{part} {x.shape} {x.dtype}, y_{part} "
          f"{y.shape} {y.dtype}; expected (N, 28, 28) uint8 and (N,) uint8")
    if y.max() > 9:
      raise UsageError(f"MNIST file {path}: y_{part} has labels outside 0..9")
  return arrays


def read_fsdd_index(builder: LocalBuilder) -> list[dict[str, Any]]:
  """Rows of `<source>/fsdd/index.csv`, typed, sorted by (digit, speaker, take)."""
  path = builder.source_path(FSDD_INDEX)
  need = {"file", "digit", "speaker", "take", "split", "sample_rate",
          "n_samples", "sha256"}
  try:
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      missing = need - set(reader.fieldnames or ())
      if missing:
        raise UsageError(
            f"FSDD index {path} lacks columns {', '.join(sorted(missing))}")
      rows = []
      for r in reader:
        rows.append({
            "file": r["file"], "digit": int(r["digit"]),
            "speaker": r["speaker"], "take": int(r["take"]),
            "split": r["split"], "sample_rate": int(r["sample_rate"]),
            "n_samples": int(r["n_samples"]), "sha256": r["sha256"],
        })
  except (ValueError, KeyError, TypeError) as e:
    raise UsageError(f"bad FSDD index {path}: {one_line(e)}") from e
  for r in rows:
    if (r["speaker"] not in FSDD_SPEAKERS or not 0 <= r["digit"] <= 9
        or r["split"] not in ("train", "test")):
      raise UsageError(f"bad FSDD index {path}: row for {r['file']}")
  rows.sort(key=lambda r: (r["digit"], r["speaker"], r["take"]))
  return rows


def read_fsdd_audio(builder: LocalBuilder, row: dict[str, Any]) -> np.ndarray:
  """The int16 waveform of one index row; UsageError naming a bad file.

  Checks: the file exists and decodes (soundfile errors are caught), its sample
  rate, that the decoded length equals index.csv's n_samples (catches truncated
  files), and the file's sha256 against index.csv.
  """
  path = builder.source_path("fsdd/" + row["file"])
  try:
    data = path.read_bytes()
    with sf.SoundFile(path) as f:
      rate, channels = f.samplerate, f.channels
      audio = f.read(dtype="int16")
  except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
    raise UsageError(f"corrupted audio file {path}: "
                     f"{one_line(e) or type(e).__name__}") from e
  if rate != row["sample_rate"] or channels != 1:
    raise UsageError(f"audio file {path} is {rate} Hz, {channels} channels; "
                     f"index.csv says {row['sample_rate']} Hz mono")
  if len(audio) != row["n_samples"]:
    raise UsageError(
        f"truncated or corrupted audio file {path}: decoded {len(audio)} "
        f"samples, index.csv says {row['n_samples']}")
  if hashlib.sha256(data).hexdigest() != row["sha256"]:
    raise UsageError(f"audio file {path} does not match its sha256 in index.csv")
  return audio


def label_feature() -> tfds.features.ClassLabel:
  return tfds.features.ClassLabel(num_classes=10)


def uint8_image(shape: tuple[int, ...], doc: str) -> tfds.features.Tensor:
  # Raw bytes (ArrayRecord compresses each record with zstd); tfds's Image
  # feature would need TensorFlow to encode PNGs.
  return tfds.features.Tensor(shape=shape, dtype=np.uint8,
                              encoding=tfds.features.Encoding.BYTES, doc=doc)


def int16_waveform(doc: str) -> tfds.features.Tensor:
  return tfds.features.Tensor(shape=(None,), dtype=np.int16,
                              encoding=tfds.features.Encoding.BYTES, doc=doc)
