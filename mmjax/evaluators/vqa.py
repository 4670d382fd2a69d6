"""Visual question answering accuracy: exact match after the VQA answer
normalisation, overall and per question family."""

from collections.abc import Callable, Iterable, Iterator, Sequence
import re

import numpy as np

from mmjax.evaluators.classification import _host

# The tables and patterns of the official VQA evaluation script
# (`VQAEval.__init__` in vqaEval.py of github.com/GT-Vision-Lab/VQA,
# Antol et al., "VQA: Visual Question Answering", ICCV 2015), unchanged,
# quirks included: the upper-case keys ("Im", "Ive", ...) never match the
# lower-cased words, and "somebody'd" maps to "somebodyd".
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't",
    "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd",
    "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've"}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2",
                "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\",
               "_", "-", ">", "<", "@", "`", ",", "?", "!")
# "(?!<=\d)" is the script's typo for "(?<!\d)": a look-ahead that always
# holds, so every period not followed by a digit goes ("2.5" keeps its).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
  """The official script's `processPunctuation`: each of `PUNCTUATION` is
  deleted where the answer has it next to a space (or has a digit,digit
  comma anywhere), else replaced by a space; then periods not followed by a
  digit are deleted (at most 32: the script passes `re.UNICODE` as `sub`'s
  count)."""
  out = text
  for p in PUNCTUATION:
    if p + " " in text or " " + p in text or _COMMA_STRIP.search(text):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def process_digit_article(text: str) -> str:
  """The official script's `processDigitArticle`: lower-case, split on
  whitespace, number words to digits ("two" -> "2", "none" -> "0"), drop
  the articles a/an/the, restore contractions missing their apostrophe
  ("dont" -> "don't"), join with single spaces."""
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
  """An answer as the official VQA evaluation script normalises it.

  Antol et al., "VQA: Visual Question Answering", ICCV 2015; the script is
  vqaEval.py of github.com/GT-Vision-Lab/VQA (`VQAEval.evaluate`): newlines
  and tabs become spaces, the ends are stripped, then `process_punctuation`
  and `process_digit_article`. "Two." -> "2", "the cat" -> "cat", "yes!" ->
  "yes", "dont" -> "don't" ("don't" stays).
  """
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return process_digit_article(process_punctuation(text))


def vqa(predict_fn: Callable[[dict], dict], batches: Iterable[dict], *,
        tokenizer=None, answers: Sequence[str] | None = None,
        families: Sequence[str] | None = None
        ) -> Iterator[tuple[str, float]]:
  """Exact-match VQA accuracy after `normalize_answer`, one ground-truth
  answer per question.

  Generated answers: `predict_fn(batch)["tokens"]` int32 [B, T] (padding
  after the end token) against the batch's answer "text" int32 [B, L], both
  decoded with `tokenizer.decode`. Classifier head: where `predict_fn`
  returns "logits" [B, K] and `answers` (the closed answer vocabulary, K
  strings) is given, the prediction is `answers[argmax logits]` and the
  ground truth `answers[batch["label"]]`. Both sides are normalised (the
  official script normalises only where the 10 annotators disagree, and
  scores min(1, matches / 3) against them; with one ground truth the score
  is exact match). Padding examples (batch "valid" False) are skipped.

  Args:
    tokenizer: the run's text tokenizer (`build` passes it), with
      `decode(ids [N, L]) -> list[str]`; needed for generated answers.
    answers: the closed answer vocabulary of a classifier head.
    families: question family names; the batch's "family" int [B] indexes
      them.

  Yields:
    ("accuracy", a), then ("accuracy/<family>", a_f) for each family with
    at least one example, in the order of `families`.
  """
  correct = np.zeros(0, bool)
  family_ids = np.zeros(0, int)
  for batch in batches:
    valid = _host(batch["valid"]).astype(bool)
    if not valid.any():
      continue
    out = predict_fn(batch)
    if "logits" in out and answers is not None:
      predicted = [answers[k] for k in _host(out["logits"])[valid].argmax(-1)]
      truth = [answers[k] for k in _host(batch["label"])[valid]]
    elif "tokens" in out:
      if tokenizer is None:
        raise ValueError("vqa needs the text tokenizer to decode generated "
                         "answers (the run's, or the tokenizer option)")
      predicted = tokenizer.decode(_host(out["tokens"])[valid])
      truth = tokenizer.decode(_host(batch["text"])[valid])
    else:
      raise ValueError("vqa needs predictions with 'tokens', or 'logits' and "
                       f"the answers option; got {sorted(out)}")
    correct = np.concatenate([correct, [
        normalize_answer(p) == normalize_answer(t)
        for p, t in zip(predicted, truth)]])
    if families is not None:
      family_ids = np.concatenate([family_ids,
                                   _host(batch["family"])[valid]])
  yield "accuracy", float(correct.mean()) if len(correct) else 0.0
  for f, name in enumerate(families or ()):
    in_family = family_ids == f
    if in_family.any():
      yield f"accuracy/{name}", float(correct[in_family].mean())
