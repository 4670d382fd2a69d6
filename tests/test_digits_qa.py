"""Tests of the digits_qa builder (mmjax.data.builders.digits_qa).

A small config (train 400 / val 50 / test 100 / test_compositional 50) is
built from the repo's real MNIST and FSDD, twice (determinism). The checks
restate the dataset's rules independently: answers are recomputed from the
stored grid digits, spoken digit and question text; every grid cell is looked
up among the MNIST source images and every waveform among the FSDD
recordings, by content.
"""

from __future__ import annotations

import collections
import csv
import pathlib
import re

import numpy as np
import pytest
import soundfile as sf

from mmjax.data import builders
from mmjax.data.builders import digits_qa as qa
from mmjax.data.tokenizer import ByteTokenizer
from mmjax.errors import UsageError

SOURCE = builders.DEFAULT_SOURCE_DIR
SMALL = qa.DigitsQaConfig(name="small", train_size=400, val_size=50,
                          test_size=100, compositional_size=50)
SIZES = {"train": 400, "val": 50, "test": 100, "test_compositional": 50}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
CELLS = {"top left": (0, 0), "top right": (0, 28), "bottom left": (28, 0),
         "bottom right": (28, 28)}
N_MNIST_TRAIN = 55_000   # MNIST train images before the 5,000 val images
TAKES = {"train": range(0, 35), "val": range(35, 40), "test": range(40, 50),
         "test_compositional": range(40, 50)}
SPOKEN_FAMILIES = ("spoken", "spoken_in_grid", "where_spoken")
# Every question each family can ask: its templates, filled in every way.
QUESTIONS = {
    fam: {t.format(p=p, q=q, d=d) for t in templates for p in POSITIONS
          for q in POSITIONS if q != p for d in range(10)}
    for fam, templates in qa.TEMPLATES.items()}


def _build(data_dir, source=SOURCE, config=SMALL):
  b = qa.DigitsQa(config=config, data_dir=str(data_dir),
                  source_dir=str(source), file_format="array_record")
  b.download_and_prepare(file_format="array_record")
  return b


def _records(builder):
  out = {}
  for split, source in builder.as_data_source().items():
    out[split] = source.__getitems__(list(range(len(source))))
    for e in out[split]:
      e["question"] = e["question"].decode()
      e["answer"] = e["answer"].decode()
      e["family_name"] = qa.FAMILIES[e["family"]]
  return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("qa"))


@pytest.fixture(scope="module")
def records(small):
  return _records(small)


@pytest.fixture(scope="module")
def mnist_lookup():
  """Image bytes -> [(part, index, label)] over all 70,000 MNIST images."""
  lookup = collections.defaultdict(list)
  with np.load(SOURCE / "mnist" / "mnist.npz") as z:
    for part in ("train", "test"):
      x, y = z[f"x_{part}"], z[f"y_{part}"]
      for i in range(len(x)):
        lookup[x[i].tobytes()].append((part, i, int(y[i])))
  return lookup


@pytest.fixture(scope="module")
def fsdd_lookup():
  """First 6000 samples (zero-padded) bytes -> [index.csv row] for all 3,000."""
  lookup = collections.defaultdict(list)
  with open(SOURCE / "fsdd" / "index.csv", newline="") as f:
    for r in csv.DictReader(f):
      wav, rate = sf.read(SOURCE / "fsdd" / r["file"], dtype="int16")
      assert rate == 8000
      fixed = np.zeros(6000, np.int16)
      fixed[:min(6000, len(wav))] = wav[:6000]
      lookup[fixed.tobytes()].append(
          {"digit": int(r["digit"]), "speaker": r["speaker"],
           "take": int(r["take"])})
  return lookup


def _positions(question):
  return [m.group(0) for m in re.finditer(r"(top|bottom) (left|right)",
                                          question)]


def _expected_answer(e):
  """The answer of record `e`, from its question text, digits and spoken."""
  fam, q = e["family_name"], e["question"]
  grid = {p: int(d) for p, d in zip(POSITIONS, e["digits"])}
  s = int(e["spoken"])
  pos = _positions(q)
  numerals = [int(n) for n in re.findall(r"\d+", q)]
  want_pos = {"digit_at": 1, "count": 0, "sum": 2, "compare": 2, "spoken": 0,
              "spoken_in_grid": 0, "where_spoken": 0, "spoken_plus": 1}[fam]
  assert len(pos) == want_pos, q
  assert len(set(pos)) == len(pos), q
  assert len(numerals) == (1 if fam == "count" else 0), q
  if fam in ("spoken", "spoken_in_grid", "where_spoken", "spoken_plus"):
    assert "spoken" in q or "hear" in q or "said" in q, q
  if fam == "digit_at":
    return str(grid[pos[0]])
  if fam == "count":
    return str(list(grid.values()).count(numerals[0]))
  if fam == "sum":
    return str(grid[pos[0]] + grid[pos[1]])
  if fam == "compare":
    return "yes" if grid[pos[0]] > grid[pos[1]] else "no"
  if fam == "spoken":
    return str(s)
  if fam == "spoken_in_grid":
    return "yes" if s in grid.values() else "no"
  if fam == "where_spoken":
    where = [p for p, d in grid.items() if d == s]
    assert len(where) == 1, (q, grid, s)
    return where[0]
  if fam == "spoken_plus":
    return str(s + grid[pos[0]])
  raise AssertionError(fam)


def _held_out(e):
  """The documented held-out rule, restated."""
  fam = e["family_name"]
  if fam in SPOKEN_FAMILIES:
    return int(e["spoken"]) == 7
  if fam == "digit_at":
    return _positions(e["question"]) == ["bottom right"] and e["answer"] == "3"
  return False


# ------------------------------------------------------------------ constants


def test_constants_and_registration():
  assert builders.BUILDERS["digits_qa"] is qa.DigitsQa
  assert "digits_qa/default" in builders.known_names()
  assert qa.POSITIONS == POSITIONS
  assert set(qa.FAMILY_MODALITIES) == set(qa.FAMILIES) == set(qa.TEMPLATES)
  assert len(set(qa.FAMILIES)) == 8 and len(set(qa.ANSWERS)) == len(qa.ANSWERS)
  mods = collections.Counter(qa.FAMILY_MODALITIES.values())
  assert mods == {("image",): 4, ("audio",): 1, ("audio", "image"): 3}
  for fam, templates in qa.TEMPLATES.items():
    assert all(t == t.lower() for t in templates), fam
  assert SMALL.name == "small_train400_val50_test100_comp50"
  assert SMALL.short_name == "small"
  default = qa.DigitsQa(data_dir="/nonexistent")
  assert default.builder_config.name == "default"
  assert [default.builder_config.size(s) for s in qa.SPLITS] == [
      20_000, 1_000, 2_000, 1_000]
  assert "digits_qa/large" in builders.known_names()
  large = {c.short_name: c for c in qa.DigitsQa.BUILDER_CONFIGS}["large"]
  assert large.name == "large_train60000" and large.short_name == "large"
  assert [large.size(s) for s in qa.SPLITS] == [60_000, 1_000, 2_000, 1_000]


def test_vocabulary_is_what_the_families_produce():
  """Many draws of each family: the answers are exactly ANSWERS, yes/no are
  balanced, and the held-out flag is honoured both ways."""
  rng = np.random.default_rng(123)
  seen = set()
  yes = collections.defaultdict(list)
  for fam in qa.FAMILIES:
    for _ in range(3000):
      grid, s, question, answer = qa.make_question(rng, fam, False)
      e = {"family_name": fam, "question": question, "digits": grid,
           "spoken": s, "answer": answer}
      assert _expected_answer(e) == answer and not _held_out(e)
      seen.add(answer)
      if answer in ("yes", "no"):
        yes[fam].append(answer == "yes")
  assert seen == set(qa.ANSWERS)
  assert set(yes) == {"compare", "spoken_in_grid"}
  for fam, v in yes.items():
    assert 0.45 < np.mean(v) < 0.55, (fam, np.mean(v))
  for fam in SPOKEN_FAMILIES + ("digit_at",):
    for _ in range(50):
      grid, s, question, answer = qa.make_question(rng, fam, True)
      e = {"family_name": fam, "question": question, "digits": grid,
           "spoken": s, "answer": answer}
      assert _expected_answer(e) == answer and _held_out(e)
      assert qa.is_held_out(fam, s, (_positions(question) or [None])[0], answer)


# --------------------------------------------------------------------- build


def test_sizes_and_features(small, records):
  assert {k: len(v) for k, v in records.items()} == SIZES
  feats = small.info.features
  assert feats["family"].names == list(qa.FAMILIES)
  assert feats["label"].names == list(qa.ANSWERS)
  for split, recs in records.items():
    for e in recs:
      assert e["image"].shape == (56, 56, 1) and e["image"].dtype == np.uint8
      assert e["audio"].shape == (6000,) and e["audio"].dtype == np.int16
      assert e["digits"].shape == (4,) and 0 <= e["digits"].min()
      assert e["digits"].max() <= 9 and 0 <= e["spoken"] <= 9
      assert e["question"] == e["question"].lower() and len(e["question"]) < 64
      assert e["question"] in QUESTIONS[e["family_name"]], e["question"]


def test_answers_are_correct(records):
  for split, recs in records.items():
    for e in recs:
      assert e["answer"] == _expected_answer(e), (split, e["question"])
      assert e["label"] == qa.ANSWERS.index(e["answer"])


def test_every_family_in_every_split(records):
  for split, recs in records.items():
    fams = collections.Counter(e["family_name"] for e in recs)
    if split == "test_compositional":
      assert set(fams) == set(SPOKEN_FAMILIES + ("digit_at",)), fams
    else:
      assert set(fams) == set(qa.FAMILIES), (split, fams)
    assert max(fams.values()) - min(fams.values()) <= 1, (split, fams)


def test_held_out_only_in_test_compositional(records):
  for split, recs in records.items():
    for e in recs:
      assert _held_out(e) == (split == "test_compositional"), (
          split, e["question"], e["answer"], e["spoken"])
  # Spoken 7 and bottom-right 3 still reach training through other families.
  train = records["train"]
  assert any(e["spoken"] == 7 for e in train)
  assert any(e["digits"][3] == 3 for e in train)


def test_yes_no_balance(records):
  for split in ("train", "test"):
    answers = [e["answer"] for e in records[split]
               if e["answer"] in ("yes", "no")]
    assert len(answers) >= 20
    assert 0.3 < np.mean([a == "yes" for a in answers]) < 0.7, split


def test_grid_is_four_mnist_digits_from_the_split(records, mnist_lookup):
  used = {}
  for split, recs in records.items():
    used[split] = set()
    for e in recs:
      picks = []
      for p, d in zip(POSITIONS, e["digits"]):
        r, c = CELLS[p]
        cell = np.ascontiguousarray(e["image"][r:r + 28, c:c + 28, 0])
        matches = mnist_lookup.get(cell.tobytes(), [])
        assert matches, (split, p)
        if split == "train":
          ok = [m for m in matches if m[0] == "train" and m[1] < N_MNIST_TRAIN]
        elif split == "val":
          ok = [m for m in matches if m[0] == "train" and m[1] >= N_MNIST_TRAIN]
        else:
          ok = [m for m in matches if m[0] == "test"]
        assert ok, (split, p, matches[:3])
        assert {m[2] for m in ok} == {int(d)}   # the stored digit label
        picks.append(ok[0][:2])
      assert len(set(picks)) == 4            # four different images
      used[split] |= set(picks)
  assert not used["train"] & used["val"]
  assert not (used["train"] | used["val"]) & (
      used["test"] | used["test_compositional"])


def test_audio_is_an_fsdd_recording_from_the_split(records, fsdd_lookup):
  takes = {}
  for split, recs in records.items():
    takes[split] = set()
    speakers = set()
    for e in recs:
      matches = fsdd_lookup.get(e["audio"].tobytes(), [])
      ok = [m for m in matches if m["take"] in TAKES[split]]
      assert ok, split
      assert {m["digit"] for m in ok} == {int(e["spoken"])}
      takes[split] |= {m["take"] for m in ok}
      speakers |= {m["speaker"] for m in ok}
    if split == "train":
      assert len(speakers) == 6
  assert not takes["train"] & takes["val"]
  assert not (takes["train"] | takes["val"]) & takes["test"]


def _assert_same_records(xs, ys):
  for x, y in zip(xs, ys, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_deterministic(records, tmp_path_factory):
  again = _records(_build(tmp_path_factory.mktemp("qa_again")))
  assert again.keys() == records.keys()
  for split, recs in records.items():
    _assert_same_records(recs, again[split])


def test_a_larger_train_split_leaves_the_other_splits_unchanged(
    records, tmp_path_factory):
  """What makes the `large` config's test figures comparable with the
  default's: only the train split depends on train_size."""
  config = qa.DigitsQaConfig(name="small", train_size=480, val_size=50,
                             test_size=100, compositional_size=50)
  other = _records(_build(tmp_path_factory.mktemp("qa_480"), config=config))
  assert len(other["train"]) == 480
  for split in ("val", "test", "test_compositional"):
    _assert_same_records(records[split], other[split])


# -------------------------------------------------------------------- errors


def test_a_split_too_large_for_tfds_without_tensorflow_is_named():
  with pytest.raises(UsageError, match=r"train has 100000 examples; a split "
                     r"holds 1 to 68,089"):
    qa.DigitsQaConfig(name="huge", train_size=100_000)


def test_corrupted_mnist_names_the_file(tmp_path):
  src = tmp_path / "src"
  (src / "mnist").mkdir(parents=True)
  (src / "fsdd").symlink_to(SOURCE / "fsdd")
  bad = src / "mnist" / "mnist.npz"
  bad.write_bytes((SOURCE / "mnist" / "mnist.npz").read_bytes()[:5000])
  with pytest.raises(UsageError) as ei:
    _build(tmp_path / "tfds", src)
  msg = str(ei.value)
  assert "\n" not in msg and str(bad) in msg
  assert not (tmp_path / "tfds" / "digits_qa" / SMALL.name / "1.0.0").exists()


def test_count_errors_scores_the_count_and_the_repeat_shortcut(small):
  """experiments/digits_qa/count_errors.py against its rules restated: the
  true answers score 1 on the count; answering the multiplicity of the
  grid's most frequent digit scores 1 on that and, on the count, the
  fraction of count questions where the two agree."""
  from mmjax import configs  # pylint: disable=import-outside-toplevel
  script = configs.load_module(
      pathlib.Path(__file__).parents[1] / "experiments/digits_qa/count_errors.py")
  source = small.as_data_source()["test"]
  records = source.__getitems__(list(range(len(source))))
  count = [e for e in records if qa.FAMILIES[e["family"]] == "count"]
  assert count
  repeats = [str(max(collections.Counter(e["digits"].tolist()).values()))
             for e in records]
  truth = script.count_errors([e["answer"].decode() for e in records], records)
  assert truth["questions"] == len(count)
  assert truth["answers_the_count"] == 1.0
  assert sum(map(sum, truth["confusion"].values())) == len(count)
  shortcut = script.count_errors(repeats, records)
  agree = np.mean([r == e["answer"].decode() for r, e in zip(repeats, records)
                   if qa.FAMILIES[e["family"]] == "count"])
  assert shortcut["answers_the_most_frequent_digits_multiplicity"] == 1.0
  assert shortcut["answers_the_count"] == round(float(agree), 4)


def test_digit_probe_substitutes_the_digit_and_scores_the_ten_answers(small):
  """experiments/digits_qa/digit_probe.py: the substituted questions are
  the templates filled with the new digit; answering every substitution
  with its true count scores 1 on the count, and answering the original
  question's count to all ten scores answer_unchanged 1 and, on the count,
  the fraction of (digit, question) pairs where the two counts agree."""
  from mmjax import configs  # pylint: disable=import-outside-toplevel
  script = configs.load_module(
      pathlib.Path(__file__).parents[1] / "experiments/digits_qa/digit_probe.py")
  source = small.as_data_source()["test"]
  records = [e for e in source.__getitems__(list(range(len(source))))
             if qa.FAMILIES[e["family"]] == "count"]
  assert records
  tokenizer = ByteTokenizer(64)
  ids, _ = tokenizer([e["question"].decode() for e in records])
  for d in range(10):
    texts = tokenizer.decode(script.substitute_digit(ids, d, tokenizer.offset))
    for text, e in zip(texts, records):
      assert text == re.sub(r"\d", str(d), e["question"].decode())
  counts = np.array([[str(e["digits"].tolist().count(d)) for e in records]
                     for d in range(10)])
  truth = script.score(counts, records)
  assert truth["questions"] == len(records)
  assert truth["answers"] == 10 * len(records)
  assert truth["answers_the_count"] == 1.0
  original = np.array([e["answer"].decode() for e in records])
  same = script.score(np.tile(original, (10, 1)), records)
  assert same["answer_unchanged"] == 1.0
  assert same["answers_the_count"] == round(float(np.mean(
      counts == original[None])), 4)
