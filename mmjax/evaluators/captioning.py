"""Caption metrics (BLEU, CIDEr-D, ROUGE-L, optionally METEOR) of generated
captions, with the MS-COCO caption evaluation code (`pycocoevalcap`).

Chen et al., "Microsoft COCO Captions: Data Collection and Evaluation
Server", arXiv 2015, describe the protocol: every caption (references and
generations) is tokenised by Stanford CoreNLP's PTBTokenizer, lower-cased,
with punctuation tokens removed, and the scorers compare the tokens:

  BLEU-n   Papineni et al., "BLEU: a Method for Automatic Evaluation of
           Machine Translation", ACL 2002: corpus-level clipped n-gram
           precisions, geometric mean over 1..n, brevity penalty against the
           reference length closest to each hypothesis's.
  CIDEr-D  Vedantam et al., "CIDEr: Consensus-based Image Description
           Evaluation", CVPR 2015: tf-idf weighted n-gram (1..4) cosine
           similarity averaged over the references. pycocoevalcap's `Cider`
           is the CIDEr-D variant (Section 8 of the paper): no stemming,
           hypothesis tf-idf clipped by the reference's, a Gaussian length
           penalty (sigma 6), times 10 -- the number the COCO server reports.
           The idf comes from the references of the captions evaluated, so
           the score depends on the set (a subset differs from the whole
           split, and a single image always scores 0).
  ROUGE-L  Lin, "ROUGE: A Package for Automatic Evaluation of Summaries",
           ACL Workshop 2004: LCS-based F-measure with beta 1.2, from the best
           precision and best recall over the references, averaged over
           images.
  METEOR   Denkowski & Lavie, "Meteor Universal", WMT 2014 (METEOR 1.5, the
           jar shipped with pycocoevalcap, English, normalised): only with
           `java_metrics=True` and Java on the PATH; it takes ~10 s to start.

SPICE (Anderson et al., ECCV 2016) is left out: pycocoevalcap's `Spice`
downloads Stanford CoreNLP 3.6.0 on first use and writes caches into the
installed package, so it does not run offline.

Tokenisation (`tokenization_name`): "ptb" runs the Stanford PTBTokenizer jar
shipped with pycocoevalcap, with the command line and punctuation filter of
its `PTBTokenizer` (the input file goes to the system temporary directory
instead of the installed package, which may be read-only), where
`shutil.which("java")` finds Java; otherwise "python", `python_tokenize`, a
pure-Python imitation of it that agrees with it on ordinary captions.
Scores from the two may differ slightly on unusual text; each evaluation logs
which one it used.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
import logging
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

import numpy as np

from mmjax.evaluators.classification import _host

log = logging.getLogger(__name__)

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS: tokens dropped after PTB
# tokenisation. The bracket tokens are upper-case while `-lowerCase` output
# is not, so bracket tokens (-lrb- ...) survive, as on the COCO server.
PUNCTUATIONS = ("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                ".", "?", "!", ",", ":", "-", "--", "...", ";")

TOKENIZATIONS = ("ptb", "python")


def _pycocoevalcap(module: str):
  """The pycocoevalcap submodule `module`, with an install hint."""
  try:
    return __import__(f"pycocoevalcap.{module}", fromlist=["_"])
  except ImportError as e:
    raise ImportError("the captioning evaluator needs pycocoevalcap: "
                      "pip install pycocoevalcap") from e


def _ptb_jar() -> pathlib.Path:
  tokenizer = _pycocoevalcap("tokenizer.ptbtokenizer")
  return (pathlib.Path(tokenizer.__file__).parent
          / tokenizer.STANFORD_CORENLP_3_4_1_JAR)


def tokenization_name() -> str:
  """The tokenisation `tokenize` uses by default: "ptb" (Stanford
  PTBTokenizer, Java) when `java` is on the PATH, else "python"
  (`python_tokenize`)."""
  return "ptb" if shutil.which("java") else "python"


def ptb_tokenize(captions: Sequence[str]) -> list[str]:
  """Captions -> space-joined tokens, as pycocoevalcap's PTBTokenizer.

  Runs `java -cp stanford-corenlp-3.4.1.jar
  edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase` once on
  all captions (one per line, newlines replaced by spaces) and drops the
  tokens in `PUNCTUATIONS`.
  """
  if not captions:
    return []
  text = "".join(c.replace("\n", " ").replace("\r", " ") + "\n"
                 for c in captions)
  with tempfile.TemporaryDirectory(prefix="mmjax-ptb-") as tmp:
    path = os.path.join(tmp, "captions.txt")
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    result = subprocess.run(
        ["java", "-cp", str(_ptb_jar()),
         "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
         "-lowerCase", "-encoding", "utf-8", path],
        capture_output=True, check=False)
  if result.returncode:
    raise RuntimeError("Stanford PTBTokenizer failed: "
                       + result.stderr.decode("utf-8", "replace")[-2000:])
  lines = result.stdout.decode("utf-8").split("\n")
  if len(lines) < len(captions):
    raise RuntimeError(f"Stanford PTBTokenizer returned {len(lines)} lines "
                       f"for {len(captions)} captions")
  return [" ".join(w for w in line.rstrip().split(" ")
                   if w and w not in PUNCTUATIONS)
          for line in lines[:len(captions)]]


# Abbreviations whose final period PTBTokenizer keeps (a common subset of its
# list), besides letter-period acronyms such as "u.s." and "p.m.".
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc prof mt inc ltd co corp".split())
_ACRONYM = re.compile(r"^(?:[a-z]\.){2,}$")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-",
             "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta",
                "wanna": "wan na", "lemme": "lem me", "gimme": "gim me"}
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_CLITIC = re.compile(r"(?<=\w)(%s)$" % "|".join(_CLITICS))
# Double quotes (PTB's `` and '') and backticks go; curly single quotes
# become the apostrophe, as PTBTokenizer normalises them.
_QUOTES = str.maketrans({'"': " ", "`": " ", "\u201c": " ", "\u201d": " ",
                         "\u2018": "'", "\u2019": "'"})


def _python_words(caption: str) -> list[str]:
  text = caption.lower().translate(_QUOTES)
  for bracket, token in _BRACKETS.items():
    text = text.replace(bracket, f" {token} ")
  text = re.sub(r"\.\.\.|--|[;!?]+|[$%+=]", r" \g<0> ", text)
  # Commas and colons split unless between digits (1,000 and 5:30 stay).
  text = re.sub(r"(?<!\d)[,:]|[,:](?!\d)", r" \g<0> ", text)
  words = []
  for word in text.split():
    if word not in _CLITICS:  # quotes around a word go
      word = word.strip("'")
    if word.endswith(".") and word.strip(".") and not (
        word[:-1] in _ABBREVIATIONS or _ACRONYM.match(word)):
      word = word[:-1]
    if word not in _CLITICS:
      word = word.rstrip("'")
    if word in _SPLIT_WORDS:
      words.extend(_SPLIT_WORDS[word].split())
      continue
    clitic = _CLITIC.search(word)
    if clitic and clitic.start() > 0:
      words.extend((word[:clitic.start()], clitic.group()))
    elif word:
      words.append(word)
  return words


def python_tokenize(captions: Sequence[str]) -> list[str]:
  """Captions -> space-joined tokens, a pure-Python imitation of
  `ptb_tokenize` for machines without Java.

  Lower-cases; turns brackets into PTB's -lrb- -rrb- -lsb- -rsb- -lcb- -rcb-
  (kept, as the Java path keeps them); splits off "...", "--", runs of
  ";!?", "$ % + =", commas and colons (not between digits), a word's final
  period (not of an acronym like "u.s." or a common abbreviation like
  "mr."), the clitics n't 's 're 've 'll 'd 'm ("isn't" -> "is n't", "can't"
  -> "ca n't") and PTB's split words ("gonna" -> "gon na"); drops quotes
  (straight, curly, backticks; a curly apostrophe becomes "'") and the tokens
  in `PUNCTUATIONS`; splits on whitespace. Hyphenated words, numbers ("3.5",
  "1,000") and slashes stay whole. It gives the Java path's tokens on all 430
  COCO captions of data/coco_mini (tests/test_generation_evaluators.py).
  """
  return [" ".join(w for w in _python_words(c) if w not in PUNCTUATIONS)
          for c in captions]


def tokenize(captions: Sequence[str], tokenization: str | None = None
             ) -> list[str]:
  """Captions -> space-joined tokens with `tokenization` ("ptb" or "python";
  None: `tokenization_name()`)."""
  tokenization = tokenization or tokenization_name()
  if tokenization == "ptb":
    return ptb_tokenize(captions)
  if tokenization == "python":
    return python_tokenize(captions)
  raise ValueError(f"unknown tokenization {tokenization!r} (known: "
                   f"{', '.join(TOKENIZATIONS)})")


def caption_scores(hypotheses: Sequence[str],
                   references: Sequence[Sequence[str]], *,
                   tokenization: str | None = None,
                   java_metrics: bool = False) -> dict[str, float]:
  """Corpus caption metrics of N hypotheses against their references.

  Args:
    hypotheses: N generated captions (raw text).
    references: N lists of reference captions (raw text, at least one each).
    tokenization: "ptb", "python", or None for `tokenization_name()`.
    java_metrics: also METEOR, when Java is on the PATH (else a warning).

  Returns:
    {"BLEU-1".."BLEU-4", "CIDEr-D", "ROUGE-L"[, "METEOR"]: score}, each in
    [0, 1] except CIDEr-D (in [0, 10]; ~1 for good COCO captioners).
  """
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} "
                     "reference lists")
  if not hypotheses:
    raise ValueError("no captions to score")
  if any(not refs for refs in references):
    raise ValueError("every hypothesis needs at least one reference")
  flat = list(hypotheses) + [r for refs in references for r in refs]
  tokens = tokenize(flat, tokenization)
  res = {i: [tokens[i]] for i in range(len(hypotheses))}
  gts, start = {}, len(hypotheses)
  for i, refs in enumerate(references):
    gts[i] = tokens[start:start + len(refs)]
    start += len(refs)
  bleu = _pycocoevalcap("bleu.bleu").Bleu(4)
  cider = _pycocoevalcap("cider.cider").Cider()
  rouge = _pycocoevalcap("rouge.rouge").Rouge()
  scores = {f"BLEU-{n + 1}": float(b)
            for n, b in enumerate(bleu.compute_score(gts, res, verbose=0)[0])}
  scores["CIDEr-D"] = float(cider.compute_score(gts, res)[0])
  scores["ROUGE-L"] = float(rouge.compute_score(gts, res)[0])
  if java_metrics:
    if shutil.which("java"):
      meteor = _pycocoevalcap("meteor.meteor").Meteor()
      try:
        scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
      finally:
        del meteor  # its __del__ stops the Java process
    else:
      log.warning("captioning: java_metrics=True but no `java` on the PATH: "
                  "no METEOR")
  return scores


def captioning(predict_fn: Callable[[dict], dict], batches: Iterable[dict], *,
               tokenizer=None, max_examples: int | None = None,
               java_metrics: bool = False, tokenization: str | None = None
               ) -> Iterator[tuple[str, float]]:
  """Caption metrics of the generated captions against the references.

  `predict_fn(batch)["tokens"]` int32 [B, T] are the generated ids (padding
  after the end token); the batch holds an image's reference captions as
  "text" int32 [B, C, L] ([B, L]: one each) with "valid/text" bool [B, C]
  (absent: all real). Both are decoded with `tokenizer.decode`; padding
  examples (batch "valid" False), padding references and examples without
  any real reference are skipped, and batches with no valid example are not
  generated for. The metrics are those of the module docstring, computed by
  `caption_scores` over the whole split (corpus BLEU, corpus idf for
  CIDEr-D).

  Args:
    tokenizer: the run's text tokenizer (`build` passes it), with
      `decode(ids [N, L]) -> list[str]`.
    max_examples: score only the first this many valid examples (generation
      stops there); None: all. CIDEr-D's idf then comes from that subset.
    java_metrics: also METEOR (slow; needs Java).
    tokenization: "ptb", "python", or None for `tokenization_name()`.

  Yields:
    ("BLEU-1", b1) ... ("BLEU-4", b4), ("CIDEr-D", c), ("ROUGE-L", r)
    [, ("METEOR", m)], then ("exact_match", e): the fraction of examples
    whose generated caption is one of its references, character for
    character after stripping (on the training split: the fraction of
    training captions a model reproduces).
  """
  if tokenizer is None:
    raise ValueError("captioning needs the text tokenizer to decode captions "
                     "(the run's, from config.text, or the tokenizer option)")
  if max_examples is not None and max_examples < 1:
    raise ValueError(f"max_examples must be positive, got {max_examples}")
  hypotheses, references, skipped = [], [], 0
  for batch in batches:
    if max_examples is not None and len(hypotheses) >= max_examples:
      break
    valid = _host(batch["valid"]).astype(bool)
    if not valid.any():
      continue
    tokens = _host(predict_fn(batch)["tokens"])[valid]
    text = _host(batch["text"])
    if text.ndim == 2:
      text = text[:, None]
    text_valid = (_host(batch["valid/text"]).astype(bool)
                  if "valid/text" in batch else np.ones(text.shape[:2], bool))
    text, text_valid = text[valid], text_valid.reshape(text.shape[:2])[valid]
    generated = tokenizer.decode(tokens)
    decoded = iter(tokenizer.decode(text[text_valid]))
    for hypothesis, row_valid in zip(generated, text_valid):
      refs = [next(decoded) for _ in range(row_valid.sum())]
      if not refs:
        skipped += 1
      elif max_examples is None or len(hypotheses) < max_examples:
        hypotheses.append(hypothesis)
        references.append(refs)
  if skipped:
    log.warning("captioning: skipped %d examples without a reference caption",
                skipped)
  if not hypotheses:
    raise ValueError("captioning: the split has no valid example with a "
                     "reference caption")
  tokenization = tokenization or tokenization_name()
  log.info("captioning: %d captions, %s tokenisation", len(hypotheses),
           tokenization)
  yield from caption_scores(hypotheses, references, tokenization=tokenization,
                            java_metrics=java_metrics).items()
  yield "exact_match", float(np.mean([
      h.strip() in {r.strip() for r in refs}
      for h, refs in zip(hypotheses, references)]))
