"""digits_qa: trimodal question answering over MNIST grids and FSDD speech.

See `DigitsQa` for the generator. The module constants name what evaluators
and the README need: `FAMILIES` (the "family" ClassLabel, in order), `ANSWERS`
(the "label" ClassLabel: the closed answer vocabulary), `POSITIONS` (grid
cells, row-major), `FAMILY_MODALITIES` (which inputs each family needs),
`TEMPLATES` (the question wordings) and the held-out rule (`is_held_out`).
Smaller builds (tests) get their own config and directory:

  DigitsQa(config=DigitsQaConfig(name="small", train_size=400), data_dir=...)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

from mmjax.data.builders import _common
from mmjax.errors import UsageError

POSITIONS = ("top left", "top right", "bottom left", "bottom right")
FAMILIES = ("digit_at", "count", "sum", "compare", "spoken", "spoken_in_grid",
            "where_spoken", "spoken_plus")
FAMILY_MODALITIES: dict[str, tuple[str, ...]] = {
    "digit_at": ("image",), "count": ("image",), "sum": ("image",),
    "compare": ("image",), "spoken": ("audio",),
    "spoken_in_grid": ("audio", "image"), "where_spoken": ("audio", "image"),
    "spoken_plus": ("audio", "image"),
}
# Every answer any family can give: 0..18 (sums of two digits; digits, counts
# 0..4 and spoken digits are among them), yes/no, the four positions.
ANSWERS = tuple(str(i) for i in range(19)) + ("yes", "no") + POSITIONS

# {p}, {q}: position names; {d}: a digit. Chosen uniformly per example.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "digit_at": ("what digit is at the {p}?", "which digit is in the {p}?",
                 "what is the {p} digit?"),
    "count": ("how many times does {d} appear?",
              "how many {d}s are in the grid?", "count the {d}s in the grid."),
    "sum": ("what is the {p} digit plus the {q} digit?",
            "what is the sum of the {p} and {q} digits?",
            "add the {p} digit and the {q} digit."),
    "compare": ("is the {p} digit larger than the {q} digit?",
                "is the {p} digit greater than the {q} digit?",
                "is the {p} digit bigger than the {q} one?"),
    "spoken": ("which digit was spoken?", "what digit do you hear?",
               "what number is said?"),
    "spoken_in_grid": ("does the spoken digit appear in the grid?",
                       "is the digit you hear in the grid?",
                       "can you see the spoken digit?"),
    "where_spoken": ("where is the spoken digit?",
                     "where in the grid is the digit you hear?",
                     "which position shows the spoken digit?"),
    "spoken_plus": ("what is the spoken digit plus the {p} digit?",
                    "add the digit you hear to the {p} digit.",
                    "what is the sum of the spoken digit and the {p} digit?"),
}

# Held out of train/val/test, and all of test_compositional (`is_held_out`).
HELD_OUT_SPOKEN = 7
HELD_OUT_SPOKEN_FAMILIES = ("spoken", "spoken_in_grid", "where_spoken")
HELD_OUT_DIGIT_AT = ("bottom right", 3)   # (position asked, answer)
# test_compositional's kinds, drawn equally often: the three spoken-7 families
# and the bottom-right-3 digit_at question.
_COMPOSITIONAL_FAMILIES = HELD_OUT_SPOKEN_FAMILIES + ("digit_at",)

AUDIO_SAMPLES = 6000                      # 0.75 s at 8 kHz
SAMPLE_RATE = _common.FSDD_RATE
MNIST_VAL_IMAGES = 5000                   # the last 5,000 MNIST train images
TAKES = {"train": range(0, 35), "val": range(35, 40), "test": range(40, 50)}
SPLITS = ("train", "val", "test", "test_compositional")
# A split's serialized records must fit tfds's in-memory writer buffer
# (1,000 MiB): beyond it tfds spills to disk through TensorFlow, which mmjax
# does not install. A record is 15,323 bytes (the `large` build: 876.8 MiB of
# train for 60,000), mostly the int16 waveform.
RECORD_BYTES = 15_400
MAX_SPLIT_SIZE = tfds_shuffle.MAX_MEM_BUFFER_SIZE // RECORD_BYTES  # 68,089
_SPLIT_CODES = {s: i for i, s in enumerate(SPLITS)}
_SOURCES = {"train": "train", "val": "val", "test": "test",
            "test_compositional": "test"}   # image and take pool of a split
_QUADRANTS = ((slice(0, 28), slice(0, 28)), (slice(0, 28), slice(28, 56)),
              (slice(28, 56), slice(0, 28)), (slice(28, 56), slice(28, 56)))


def is_held_out(family: str, spoken: int, position: str | None = None,
                answer: str | None = None) -> bool:
  """Whether a (family, spoken digit, asked position, answer) combination is
  held out of train/val/test (and so belongs to test_compositional).

  Held out: `spoken`, `spoken_in_grid` and `where_spoken` questions whose
  spoken digit is 7; `digit_at` questions about the bottom right whose answer
  is 3. (Spoken 7 stays in training through the other families, e.g.
  spoken_plus and the audio of image-only questions; 3 stays through digit_at
  at the other positions and every other family.)
  """
  if family in HELD_OUT_SPOKEN_FAMILIES:
    return int(spoken) == HELD_OUT_SPOKEN
  if family == "digit_at":
    return (position, answer) == (HELD_OUT_DIGIT_AT[0],
                                  str(HELD_OUT_DIGIT_AT[1]))
  return False


@dataclasses.dataclass(eq=False)
class DigitsQaConfig(tfds.core.BuilderConfig):
  """digits_qa sizes and seed.

  Attributes:
    train_size, val_size, test_size, compositional_size: examples per split
      (train, val, test, test_compositional).
    seed: base seed; split s draws from numpy default_rng((seed, code(s))),
      code = index of s in SPLITS.

  A config with non-default fields gets them appended to its name (e.g.
  "small_train400_val50_test100_comp50"), so builds with different sizes never
  share a directory; `short_name` keeps the name given.
  """

  train_size: int = 20_000
  val_size: int = 1_000
  test_size: int = 2_000
  compositional_size: int = 1_000
  seed: int = 0

  def __post_init__(self):
    for split in SPLITS:
      if not 0 < self.size(split) <= MAX_SPLIT_SIZE:
        raise UsageError(
            f"digits_qa config {self.name!r}: {split} has {self.size(split)} "
            f"examples; a split holds 1 to {MAX_SPLIT_SIZE:,} (tfds writes a "
            "larger one through TensorFlow, which mmjax does not use)")
    self.short_name = self.name
    tag = ""
    for field, short in (("train_size", "train"), ("val_size", "val"),
                         ("test_size", "test"), ("compositional_size", "comp"),
                         ("seed", "seed")):
      value = int(getattr(self, field))
      if value != DigitsQaConfig.__dataclass_fields__[field].default:
        tag += f"_{short}{value}"
    if tag and not self.name.endswith(tag):
      self.name += tag

  def size(self, split: str) -> int:
    return int({"train": self.train_size, "val": self.val_size,
                "test": self.test_size,
                "test_compositional": self.compositional_size}[split])


# ---------------------------------------------------------------------------
# The generator: one example's grid digits, spoken digit, question and answer.


def _others(rng: np.random.Generator, n: int, exclude: int | None = None
            ) -> list[int]:
  """n uniform digits, all different from `exclude` (if given)."""
  if exclude is None:
    return [int(v) for v in rng.integers(0, 10, n)]
  v = rng.integers(0, 9, n)
  return [int(x + (x >= exclude)) for x in v]


def _spoken_digit(rng: np.random.Generator, family: str, held_out: bool) -> int:
  if held_out and family in HELD_OUT_SPOKEN_FAMILIES:
    return HELD_OUT_SPOKEN
  if family in HELD_OUT_SPOKEN_FAMILIES:
    return _others(rng, 1, HELD_OUT_SPOKEN)[0]
  return int(rng.integers(0, 10))


def make_question(rng: np.random.Generator, family: str, held_out: bool
                  ) -> tuple[list[int], int, str, str]:
  """(grid digits [4], spoken digit, question, answer) of one example.

  `held_out` True draws the family's held-out combination (`is_held_out`),
  False never does. See `DigitsQa` for how each family draws its grid.
  """
  s = _spoken_digit(rng, family, held_out)
  tpl = TEMPLATES[family][int(rng.integers(len(TEMPLATES[family])))]
  if family == "digit_at":
    if held_out:
      p, d = POSITIONS.index(HELD_OUT_DIGIT_AT[0]), HELD_OUT_DIGIT_AT[1]
    else:                             # uniform over the 39 allowed (p, d)
      k = int(rng.integers(39))
      banned = POSITIONS.index(HELD_OUT_DIGIT_AT[0]) * 10 + HELD_OUT_DIGIT_AT[1]
      k += k >= banned
      p, d = divmod(k, 10)
    grid = _others(rng, 4)
    grid[p] = d
    return grid, s, tpl.format(p=POSITIONS[p]), str(d)
  if family == "count":
    d, c = int(rng.integers(10)), int(rng.integers(5))  # count uniform 0..4
    grid = _others(rng, 4, exclude=d)
    for i in rng.permutation(4)[:c]:
      grid[i] = d
    return grid, s, tpl.format(d=d), str(c)
  if family == "sum":
    p, q = (int(i) for i in rng.permutation(4)[:2])
    grid = _others(rng, 4)
    return (grid, s, tpl.format(p=POSITIONS[p], q=POSITIONS[q]),
            str(grid[p] + grid[q]))
  if family == "compare":
    p, q = (int(i) for i in rng.permutation(4)[:2])
    yes = bool(rng.integers(2))
    lo, hi = sorted(int(v) for v in rng.permutation(10)[:2])   # distinct
    grid = _others(rng, 4)
    grid[p], grid[q] = (hi, lo) if yes else (lo, hi)
    return (grid, s, tpl.format(p=POSITIONS[p], q=POSITIONS[q]),
            "yes" if yes else "no")
  if family == "spoken":
    return _others(rng, 4), s, tpl, str(s)
  if family == "spoken_in_grid":
    yes = bool(rng.integers(2))
    if yes:                           # s at one random cell, others uniform
      grid = _others(rng, 4)
      grid[int(rng.integers(4))] = s
    else:
      grid = _others(rng, 4, exclude=s)
    return grid, s, tpl, "yes" if yes else "no"
  if family == "where_spoken":
    p = int(rng.integers(4))          # s exactly once
    grid = _others(rng, 4, exclude=s)
    grid[p] = s
    return grid, s, tpl, POSITIONS[p]
  if family == "spoken_plus":
    p = int(rng.integers(4))
    grid = _others(rng, 4)
    return grid, s, tpl.format(p=POSITIONS[p]), str(s + grid[p])
  raise ValueError(f"unknown family {family!r}")


def fixed_length_int16(audio: list[np.ndarray], n: int) -> np.ndarray:
  """int16 waveforms -> (R, n) int16, zero-padded at the end or cut."""
  out = np.zeros((len(audio), n), dtype=np.int16)
  for i, a in enumerate(audio):
    a = a[:n]
    out[i, :len(a)] = a
  return out


# ---------------------------------------------------------------------------


class DigitsQa(_common.LocalBuilder, skip_registration=True):
  """digits_qa: questions about a 2x2 MNIST grid and a spoken FSDD digit.

  A synthetic, deterministic question-answering set in the spirit of CLEVR
  (Johnson et al. 2017) built from real data: MNIST handwritten digits (LeCun,
  Cortes, Burges; data/mnist/PROVENANCE.md) and the Free Spoken Digit Dataset
  (Jakobovski et al., CC BY-SA 4.0, all 6 speakers; data/fsdd/PROVENANCE.md).

  Features:
    image: uint8 [56, 56, 1], a 2x2 grid of four MNIST digits (28x28 each),
      cells `POSITIONS` = top left [0:28, 0:28], top right [0:28, 28:56],
      bottom left [28:56, 0:28], bottom right [28:56, 28:56].
    audio: int16 [6000], one FSDD recording (raw 8 kHz waveform, the same
      dtype and scale as avmnist/clean's audio) zero-padded at the end or cut
      to 6,000 samples (0.75 s; 2.6% of FSDD's recordings are longer).
    question, answer: text (all lowercase; the data source returns UTF-8
      `bytes`).
    family: ClassLabel(FAMILIES); label: ClassLabel(ANSWERS), the answer's
      index (label == ANSWERS.index(answer)).
    digits: int64 [4], the grid's digit labels in POSITIONS order;
    spoken: ClassLabel(10), the spoken digit.

  Families (FAMILY_MODALITIES; templates in TEMPLATES, one drawn uniformly):
    image only:
      digit_at  "what digit is at the top left?" -> "0".."9". Cell and answer
        drawn first (uniform over the allowed pairs), the rest uniform.
      count  "how many times does 4 appear?" -> "0".."4". Digit d and count c
        uniform; c random cells hold d, the others uniform digits != d.
      sum  "what is the top left digit plus the bottom right digit?" ->
        "0".."18". Two distinct cells; grid uniform.
      compare  "is the top left digit larger than the top right digit?" ->
        yes/no (p = 1/2 each). Two distinct cells get two distinct digits,
        the larger first for "yes"; the rest uniform.
    audio only:
      spoken  "which digit was spoken?" -> "0".."9". Grid uniform (distractor).
    audio + image:
      spoken_in_grid  "does the spoken digit appear in the grid?" -> yes/no
        (p = 1/2 each). "yes": the spoken digit at one random cell, the others
        uniform (may repeat it); "no": all four cells != the spoken digit.
      where_spoken  "where is the spoken digit?" -> a position name. The
        spoken digit at exactly one random cell, the others != it.
      spoken_plus  "what is the spoken digit plus the bottom left digit?" ->
        "0".."18". Grid uniform.
  The spoken digit is uniform over 0..9; in train/val/test, spoken,
  spoken_in_grid and where_spoken draw it from 0..9 without 7 (held out), in
  test_compositional it is 7. Image-only families get a recording too (a
  distractor).
  Answer vocabulary ANSWERS (25): "0".."18", "yes", "no", the four positions.

  Sampling. Each split draws from numpy default_rng((seed, code)), code = 0..3
  for train, val, test, test_compositional, in order: the families of the
  split's n examples, a random permutation of n // k (or one more) of each of
  its k families (8; 4 in test_compositional); then per example, in record
  order: the question (`make_question`: spoken digit, template, grid digits,
  answer), one MNIST image per cell drawn uniformly from the split's images
  of that digit (four different images), one recording drawn uniformly from
  the split's recordings of the spoken digit. Record i of a split is
  example i.

  Splits (default sizes; DigitsQaConfig):
    train (20,000): MNIST train images but the last 5,000 (55,000); FSDD
      takes 0-34.
    val (1,000): the last 5,000 MNIST train images; takes 35-39.
    test (2,000): MNIST test images; takes 40-49.
    test_compositional (1,000): MNIST test images; takes 40-49; only the
      held-out combinations (`is_held_out`), a quarter each: spoken,
      spoken_in_grid and where_spoken questions whose spoken digit is 7, and
      digit_at questions about the bottom right whose answer is 3. These
      never appear in train, val or test.
  (FSDD's own split, takes 0-4 test, is not followed: train, val and test
  each get their own takes. All six speakers are in every split.)
  The `large` config ("digits_qa/large") has 60,000 training examples from
  the same images and takes; its other splits have the default's sizes and
  seeds, so they are the default's records.

  Build of the default config: 24,000 examples in 7-9 s on 2 shared CPU
  cores (measured, three builds; including reading and checking all 3,000
  FSDD files), 149 MB (142 MiB) of array_record (zstd; mostly audio). Two
  builds give equal records; the files' bytes differ, as protobuf writes each
  record's feature map in no fixed order. The `large` build: 64,000 examples
  in 15 s, 379 MB.
  Source: <source_dir>/mnist/mnist.npz and fsdd/ (index.csv, recordings).
  """

  name = "digits_qa"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "digits_qa: MNIST grids + FSDD questions."}
  BUILDER_CONFIGS = [
      DigitsQaConfig(
          name="default", description="train 20,000 / val 1,000 / test "
          "2,000 / test_compositional 1,000"),
      DigitsQaConfig(
          name="large", train_size=60_000, description="train 60,000; "
          "val, test and test_compositional the default's, record for "
          "record")]

  @property
  def _config(self) -> DigitsQaConfig:
    return self.builder_config

  def _info(self) -> tfds.core.DatasetInfo:
    return self._make_info(
        description=("digits_qa: questions about a 2x2 grid of MNIST digits "
                     "and a spoken FSDD digit; image-only, audio-only and "
                     "audio+image question families."),
        features=tfds.features.FeaturesDict({
            "image": _common.uint8_image(
                (56, 56, 1), "2x2 grid of MNIST digits, 0..255"),
            "audio": tfds.features.Tensor(
                shape=(AUDIO_SAMPLES,), dtype=np.int16,
                encoding=tfds.features.Encoding.BYTES,
                doc="FSDD waveform, 8 kHz, zero-padded or cut to 6000"),
            "question": tfds.features.Text(doc="question, lowercase"),
            "answer": tfds.features.Text(doc="answer, an entry of ANSWERS"),
            "family": tfds.features.ClassLabel(names=FAMILIES),
            "label": tfds.features.ClassLabel(names=ANSWERS),
            "digits": tfds.features.Tensor(
                shape=(4,), dtype=np.int64,
                doc="grid digit labels: top left, top right, bottom left, "
                    "bottom right"),
            "spoken": _common.label_feature(),
        }),
        homepage="https://github.com/Jakobovski/free-spoken-digit-dataset",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # no downloads: everything is local
    mnist = _common.load_mnist(self)
    mnist_path = self.source_path(_common.MNIST_FILE)
    n_train = len(mnist["y_train"]) - MNIST_VAL_IMAGES
    if n_train <= 0:
      raise UsageError(
          f"MNIST file {mnist_path} has {len(mnist['y_train'])} train images; "
          f"digits_qa needs more than {MNIST_VAL_IMAGES} (the last "
          f"{MNIST_VAL_IMAGES} are the val images)")
    images = {"train": (mnist["x_train"], np.arange(n_train)),
              "val": (mnist["x_train"], np.arange(n_train,
                                                  len(mnist["y_train"]))),
              "test": (mnist["x_test"], np.arange(len(mnist["y_test"])))}
    labels = {"train": mnist["y_train"], "val": mnist["y_train"],
              "test": mnist["y_test"]}
    image_pools = {}
    for part, (_, idx) in images.items():
      y = labels[part][idx]
      image_pools[part] = [idx[y == d] for d in range(10)]
      if any(len(p) == 0 for p in image_pools[part]):
        raise UsageError(f"MNIST file {mnist_path}: the {part} images of "
                         "digits_qa lack some digit")

    rows = _common.read_fsdd_index(self)
    # Read (and check) every file before writing anything.
    audio = fixed_length_int16(
        [_common.read_fsdd_audio(self, r) for r in rows], AUDIO_SAMPLES)
    digits = np.array([r["digit"] for r in rows])
    takes = np.array([r["take"] for r in rows])
    audio_pools = {}
    for part, rng_takes in TAKES.items():
      ok = np.isin(takes, list(rng_takes))
      audio_pools[part] = [np.flatnonzero(ok & (digits == d))
                           for d in range(10)]
      if any(len(p) == 0 for p in audio_pools[part]):
        raise UsageError(
            f"FSDD index {self.source_path(_common.FSDD_INDEX)} has no "
            f"recording with takes {rng_takes.start}-{rng_takes.stop - 1} "
            "for some digit")
    return {
        split: self._generate_examples(
            split, images[_SOURCES[split]][0], image_pools[_SOURCES[split]],
            audio, audio_pools[_SOURCES[split]])
        for split in SPLITS
    }

  def _generate_examples(self, split, x, image_pools, audio, audio_pools
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    cfg = self._config
    n = cfg.size(split)
    rng = np.random.default_rng((int(cfg.seed), _SPLIT_CODES[split]))
    held_out = split == "test_compositional"
    kinds = _COMPOSITIONAL_FAMILIES if held_out else FAMILIES
    families = rng.permutation(np.arange(n) % len(kinds))
    for i in range(n):
      family = kinds[families[i]]
      grid, spoken, question, answer = make_question(rng, family, held_out)
      image = np.zeros((56, 56, 1), dtype=np.uint8)
      used = set()
      for cell, d in enumerate(grid):
        pool = image_pools[d]
        j = int(pool[rng.integers(len(pool))])
        while j in used and len(pool) > 4:
          j = int(pool[rng.integers(len(pool))])
        used.add(j)
        image[_QUADRANTS[cell]] = x[j][..., None]
      pool = audio_pools[spoken]
      yield i, {
          "image": image, "audio": audio[pool[rng.integers(len(pool))]],
          "question": question, "answer": answer, "family": family,
          "label": ANSWERS.index(answer),
          "digits": np.array(grid, dtype=np.int64), "spoken": spoken,
      }
