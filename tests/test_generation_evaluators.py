"""The captioning and VQA evaluators on hand-made generations, and `build`
passing the run's tokenizer."""

import collections
import importlib.util
import json
import math
import os
import pathlib
import shutil

import numpy as np
import pytest

from mmjax import evaluators
from mmjax.data.tokenizer import ByteTokenizer
from mmjax.evaluators.captioning import (PUNCTUATIONS, caption_scores,
                                        ptb_tokenize, python_tokenize,
                                        tokenization_name)
from mmjax.evaluators.vqa import normalize_answer

REPO = pathlib.Path(__file__).resolve().parent.parent
HAS_JAVA = shutil.which("java") is not None
needs_pycocoevalcap = pytest.mark.skipif(
    importlib.util.find_spec("pycocoevalcap") is None,
    reason="pycocoevalcap is not installed")
TOKENIZER = ByteTokenizer(max_length=64)


def reference_bleu(hypotheses, references, max_n=4):
  """Corpus BLEU-1..max_n of Papineni et al., ACL 2002, written here from
  the paper: clipped n-gram counts and hypothesis n-gram counts summed over
  the corpus, geometric mean of the precisions 1..n, brevity penalty
  exp(1 - r / c) when the total hypothesis length c is below r, the sum of
  the reference lengths closest to each hypothesis's (the shorter on a tie,
  as pycocoevalcap). Inputs are whitespace-tokenised strings."""
  correct, total = np.zeros(max_n), np.zeros(max_n)
  hyp_len = ref_len = 0
  for hyp, refs in zip(hypotheses, references):
    h, rs = hyp.split(), [r.split() for r in refs]
    hyp_len += len(h)
    ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
    for n in range(1, max_n + 1):
      grams = collections.Counter(tuple(h[i:i + n])
                                  for i in range(len(h) - n + 1))
      max_ref = collections.Counter()
      for r in rs:
        for g, c in collections.Counter(
            tuple(r[i:i + n]) for i in range(len(r) - n + 1)).items():
          max_ref[g] = max(max_ref[g], c)
      correct[n - 1] += sum(min(c, max_ref[g]) for g, c in grams.items())
      total[n - 1] += max(len(h) - n + 1, 0)
  penalty = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
  precisions = correct / total
  return [penalty * float(np.prod(precisions[:n]) ** (1 / n))
          for n in range(1, max_n + 1)]


def caption_batches(hypotheses, references, batch_size=3, num_refs=3):
  """Batches of ByteTokenizer ids: "text" [B, C, L] with "valid/text" [B, C]
  (references beyond an image's padded with junk), the generation of each
  example in "tokens" [B, T] for the fake predict_fn, and one padding
  example (junk, valid False) at the end of each batch."""
  batches = []
  for start in range(0, len(hypotheses), batch_size - 1):
    hyps = list(hypotheses[start:start + batch_size - 1])
    refs = [list(r) for r in references[start:start + batch_size - 1]]
    valid = [True] * len(hyps) + [False] * (batch_size - len(hyps))
    hyps += ["padding junk"] * (batch_size - len(hyps))
    refs += [["padding junk"]] * (batch_size - len(refs))
    ref_valid = [[c < len(r) for c in range(num_refs)] for r in refs]
    texts = [(r + ["junk reference"] * num_refs)[:num_refs] for r in refs]
    text = TOKENIZER([t for row in texts for t in row])[0]
    batches.append({
        "tokens": TOKENIZER(hyps)[0],
        "text": text.reshape(batch_size, num_refs, -1),
        "valid/text": np.array(ref_valid),
        "valid": np.array(valid)})
  return batches


def predict(batch):
  return {"tokens": batch["tokens"]}


# Already lower-case without punctuation: both tokenisations leave them as
# they are, so the reference BLEU sees the same tokens.
HYPOTHESES = ["a dog is running on grass", "a cat sits on the red mat",
              "two men play football in a park", "a bowl of fruit",
              "a plane flying over the sea at sunset"]
REFERENCES = [
    ["a dog is running on the grass", "a brown dog runs on green grass"],
    ["a cat sitting on a mat", "the cat sits on the red mat",
     "a black cat on a rug"],
    ["two men playing soccer in a park"],
    ["a bowl full of fresh fruit on a table", "fruit in a bowl"],
    ["an airplane flies over the ocean at sunset",
     "a plane in the sky over the sea"]]


@needs_pycocoevalcap
def test_bleu_matches_an_independent_implementation():
  results = dict(evaluators.captioning(
      predict, caption_batches(HYPOTHESES, REFERENCES), tokenizer=TOKENIZER,
      tokenization="python"))
  expected = reference_bleu(HYPOTHESES, REFERENCES)
  for n in range(4):
    assert results[f"BLEU-{n + 1}"] == pytest.approx(expected[n], rel=1e-6)
  assert expected[0] > expected[1] > expected[2] > expected[3] > 0.4
  # Short hypotheses, every n-gram in a reference: the brevity penalty alone,
  # exp(1 - 32 / 16) with the closest reference lengths 7 6 7 4 8.
  short = ["a dog", "the cat sits on the red", "two men", "fruit in a bowl",
           "a plane"]
  scores = caption_scores(short, REFERENCES, tokenization="python")
  expected = reference_bleu(short, REFERENCES)
  assert expected == pytest.approx([math.exp(-1)] * 4)
  for n in range(4):
    assert scores[f"BLEU-{n + 1}"] == pytest.approx(expected[n], rel=1e-6)


@needs_pycocoevalcap
def test_identical_captions_score_high_and_unrelated_ones_zero():
  first = [r[0] for r in REFERENCES]
  same = dict(evaluators.captioning(
      predict, caption_batches(first, REFERENCES), tokenizer=TOKENIZER,
      tokenization="python"))
  assert same["BLEU-4"] == pytest.approx(1.0)
  assert same["BLEU-1"] == pytest.approx(1.0)
  assert same["ROUGE-L"] == pytest.approx(1.0)
  assert same["CIDEr-D"] > 3  # 10 x (a perfect match on 1 of 1-3 refs)
  assert same["exact_match"] == 1.0
  unrelated = ["zebra xylophone quantum"] * 5
  other = dict(evaluators.captioning(
      predict, caption_batches(unrelated, REFERENCES), tokenizer=TOKENIZER,
      tokenization="python"))
  assert other["BLEU-4"] < 1e-6 and other["BLEU-1"] < 1e-6
  assert other["CIDEr-D"] == 0 and other["ROUGE-L"] == 0
  assert other["exact_match"] == 0.0
  assert set(other) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D",
                        "ROUGE-L", "exact_match"}


@needs_pycocoevalcap
def test_captioning_skips_padding_and_stops_at_max_examples():
  calls = []

  def counting_predict(batch):
    calls.append(1)
    return predict(batch)

  batches = caption_batches(HYPOTHESES, REFERENCES)  # 3 batches of 2 + pad
  full = dict(evaluators.captioning(predict, batches, tokenizer=TOKENIZER,
                                    tokenization="python"))
  assert full.pop("exact_match") == 0.0  # no hypothesis is a reference
  # The padding rows and padded references ("junk") change nothing: the
  # same numbers as the scores of the plain lists.
  assert full == pytest.approx(caption_scores(
      HYPOTHESES, REFERENCES, tokenization="python"))
  first = dict(evaluators.captioning(counting_predict, batches,
                                     tokenizer=TOKENIZER, max_examples=3,
                                     tokenization="python"))
  first.pop("exact_match")
  assert len(calls) == 2  # the third batch is not generated for
  assert first == pytest.approx(caption_scores(
      HYPOTHESES[:3], REFERENCES[:3], tokenization="python"))
  # An all-padding batch is not generated for; [B, L] "text" is one
  # reference per example.
  calls.clear()
  pad = {**batches[0], "valid": np.zeros(3, bool)}
  single = {"tokens": TOKENIZER(HYPOTHESES[:2])[0],
            "text": TOKENIZER([r[0] for r in REFERENCES[:2]])[0],
            "valid": np.ones(2, bool)}
  results = dict(evaluators.captioning(counting_predict, [pad, single],
                                       tokenizer=TOKENIZER,
                                       tokenization="python"))
  results.pop("exact_match")
  assert len(calls) == 1
  assert results == pytest.approx(caption_scores(
      HYPOTHESES[:2], [r[:1] for r in REFERENCES[:2]],
      tokenization="python"))
  with pytest.raises(ValueError, match="tokenizer"):
    dict(evaluators.captioning(predict, batches))


@needs_pycocoevalcap
def test_python_tokenization_mimics_ptb():
  assert PUNCTUATIONS == tuple(pytest.importorskip(
      "pycocoevalcap.tokenizer.ptbtokenizer").PUNCTUATIONS)
  assert python_tokenize([
      'A man\'s dog (brown) isn\'t "happy", he\'s running... Can\'t stop!',
      "Two people at 3.5 dollars; 1,000 t-shirts in the U.S."]) == [
          "a man 's dog -lrb- brown -rrb- is n't happy he 's running ca n't "
          "stop", "two people at 3.5 dollars 1,000 t-shirts in the u.s."]
  assert tokenization_name() == ("ptb" if HAS_JAVA
                                                else "python")


@needs_pycocoevalcap
def test_captioning_without_java_uses_the_python_tokenization(monkeypatch,
                                                              caplog):
  monkeypatch.setattr(shutil, "which", lambda name: None)
  assert tokenization_name() == "python"
  with caplog.at_level("INFO", logger="mmjax.evaluators.captioning"):
    results = dict(evaluators.captioning(
        predict, caption_batches(HYPOTHESES, REFERENCES),
        tokenizer=TOKENIZER, java_metrics=True))  # no METEOR without Java
  results.pop("exact_match")
  assert results == pytest.approx(caption_scores(
      HYPOTHESES, REFERENCES, tokenization="python"))
  assert "5 captions, python tokenisation" in caplog.text
  assert "no METEOR" in caplog.text


@needs_pycocoevalcap
@pytest.mark.skipif(not HAS_JAVA, reason="no java on the PATH")
def test_ptb_tokenization_matches_pycocoevalcap_and_the_python_mimic():
  ptbtokenizer = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
  with open(REPO / "data" / "coco_mini" / "captions.jsonl",
            encoding="utf-8") as f:
    captions = [c for line in f for c in json.loads(line)["captions"]]
  captions += ["A man's dog (brown) isn't \"happy\" -- he's running!",
               "a kitchen with a stove, sink, and refrigerator."]
  ptb = ptb_tokenize(captions)
  assert ptb == python_tokenize(captions)  # 432 captions
  if os.access(pathlib.Path(ptbtokenizer.__file__).parent, os.W_OK):
    upstream = ptbtokenizer.PTBTokenizer().tokenize(
        {i: [{"caption": c}] for i, c in enumerate(captions[-30:])})
    assert [upstream[i][0] for i in range(30)] == ptb[-30:]
  results = dict(evaluators.captioning(
      predict, caption_batches(HYPOTHESES, REFERENCES), tokenizer=TOKENIZER,
      tokenization="ptb"))
  assert results["BLEU-4"] == pytest.approx(
      reference_bleu(HYPOTHESES, REFERENCES)[3], rel=1e-6)


@pytest.mark.slow  # METEOR's Java start takes ~10 s
@needs_pycocoevalcap
@pytest.mark.skipif(not HAS_JAVA, reason="no java on the PATH")
def test_meteor_with_java_metrics():
  results = dict(evaluators.captioning(
      predict, caption_batches(HYPOTHESES, REFERENCES), tokenizer=TOKENIZER,
      java_metrics=True))
  assert 0.2 < results["METEOR"] < 0.8


def test_normalize_answer_follows_the_official_vqa_script():
  normalize = normalize_answer
  assert normalize("Two.") == "2"
  assert normalize("the cat") == "cat"
  assert normalize("yes!") == "yes"
  assert normalize("dont") == "don't"  # the contractions table adds the '
  assert normalize("don't") == "don't"
  assert normalize("An Apple\n") == "apple"
  assert normalize("none") == "0"
  assert normalize("2.5") == "2.5"  # a period before a digit stays
  assert normalize("1,000") == "1000"  # digit,digit: punctuation deleted
  assert normalize("red-ish car") == "red ish car"  # "-" becomes a space
  assert normalize("Yes, it is.") == "yes it is"


def test_vqa_generated_answers_per_family_with_padding():
  # 6 real questions and 2 padding rows; families: 0 count, 1 yes/no, 2 other.
  predicted = ["Two.", "three", "yes!", "No", "a red car", "blue", "x", "x"]
  truth = ["2", "4", "yes", "yes", "red car", "the blue", "x", "y"]
  family = np.array([0, 0, 1, 1, 2, 2, 0, 1])
  valid = np.array([True] * 6 + [False] * 2)
  batch = {"tokens": TOKENIZER(predicted)[0], "text": TOKENIZER(truth)[0],
           "family": family, "valid": valid}
  results = dict(evaluators.vqa(predict, [batch], tokenizer=TOKENIZER,
                                families=["count", "yes/no", "other"]))
  assert results == {"accuracy": pytest.approx(4 / 6),
                     "accuracy/count": 0.5, "accuracy/yes/no": 0.5,
                     "accuracy/other": 1.0}
  # Split into two batches, one of them all padding: the same.
  halves = [{k: v[:4] for k, v in batch.items()},
            {k: v[4:] for k, v in batch.items()},
            {**batch, "valid": np.zeros(8, bool)}]
  assert dict(evaluators.vqa(predict, halves, tokenizer=TOKENIZER,
                             families=["count", "yes/no", "other"])) == results
  # A family without examples yields nothing.
  only = dict(evaluators.vqa(predict, [batch], tokenizer=TOKENIZER,
                             families=["count", "yes/no", "other", "color"]))
  assert "accuracy/color" not in only


def test_vqa_classifier_head():
  answers = ["yes", "no", "2", "red"]
  logits = np.eye(4)[[0, 1, 2, 3, 0]]  # predictions yes no 2 red yes
  batch = {"label": np.array([0, 0, 2, 3, 1]),
           "family": np.array([0, 0, 1, 1, 0]),
           "valid": np.array([True, True, True, True, False])}
  results = dict(evaluators.vqa(lambda b: {"logits": logits}, [batch],
                                answers=answers, families=["yes/no", "other"]))
  assert results == {"accuracy": 0.75, "accuracy/yes/no": 0.5,
                     "accuracy/other": 1.0}
  with pytest.raises(ValueError, match="tokens"):
    dict(evaluators.vqa(lambda b: {"logits": logits}, [batch]))


def test_build_passes_the_run_tokenizer():
  seen = {}

  def takes_tokenizer(predict_fn, batches, *, tokenizer=None, scale=1):
    seen["tokenizer"], seen["scale"] = tokenizer, scale
    yield "x", 1.0

  def no_tokenizer(predict_fn, batches, scale=1):
    seen["scale"] = scale
    yield "x", 1.0

  run_tokenizer, own = ByteTokenizer(8), ByteTokenizer(16)
  original = dict(evaluators.EVALUATORS)
  try:
    evaluators.EVALUATORS.update(takes=takes_tokenizer, plain=no_tokenizer)
    evaluator = evaluators.build("takes", {"scale": 2},
                                 tokenizer=run_tokenizer)
    assert evaluator.options == {"scale": 2, "tokenizer": run_tokenizer}
    dict(evaluator(predict, []))
    assert seen == {"tokenizer": run_tokenizer, "scale": 2}
    evaluator = evaluators.build("takes", {"tokenizer": own},
                                 tokenizer=run_tokenizer)
    assert evaluator.options["tokenizer"] is own
    evaluator = evaluators.build("plain", {"scale": 3},
                                 tokenizer=run_tokenizer)
    assert evaluator.options == {"scale": 3}
    dict(evaluator(predict, []))
    assert evaluators.build("captioning", {}, tokenizer=run_tokenizer
                            ).options == {"tokenizer": run_tokenizer}
    assert evaluators.build("vqa", {"families": ["a"]}).options == {
        "families": ["a"], "tokenizer": None}
  finally:
    evaluators.EVALUATORS.clear()
    evaluators.EVALUATORS.update(original)
