"""Does a digits_qa model read the digit that a counting question names?

  python experiments/digits_qa/digit_probe.py --config configs/digits_qa.py:ARGS \
      --workdir DIR [--split test]

Restores the run in DIR (its selected or latest checkpoint) and asks every
counting question of SPLIT ("how many times does 4 appear?") ten times, with
the question's digit replaced by each of 0..9 and the image and audio kept.
It prints one JSON object over those 10 x N answers: how often the answer is
the count of the substituted digit in the grid, how often it is the
multiplicity of the grid's most frequent digit (whatever digit is asked),
and how often it equals the answer to the original question. A model that
reads the digit changes its answer with it; one that ignores it answers the
same for all ten. Generative models (greedy answers) and answer classifiers
(the arg max over the answer vocabulary) alike.
"""

import collections
import json
import sys

import jax
import numpy as np

from mmjax import cli, evaluate, parallel
from mmjax.data import pipeline
from mmjax.data.builders import digits_qa

COUNT = digits_qa.FAMILIES.index("count")
DIGITS = tuple(ord(str(d)) for d in range(10))


def substitute_digit(ids: np.ndarray, digit: int, offset: int) -> np.ndarray:
  """ids int [B, L] of byte-tokenised questions (byte b is id b + offset),
  each with at most one digit -> a copy with that digit replaced by
  `digit`."""
  out = np.array(ids)
  out[np.isin(out, np.array(DIGITS) + offset)] = DIGITS[digit] + offset
  return out


def score(answers: np.ndarray, records: list[dict]) -> dict:
  """answers str [10, N]: row d answers the N counting `records` (with
  "digits") asked about digit d; row `record digit` is the original."""
  asked = [int(next(c for c in r["question"].decode() if c.isdigit()))
           for r in records]
  original = answers[asked, np.arange(len(records))]
  right = repeats = unchanged = 0
  for d in range(10):
    for i, r in enumerate(records):
      grid = r["digits"].tolist()
      right += answers[d, i] == str(grid.count(d))
      repeats += answers[d, i] == str(max(collections.Counter(grid).values()))
      unchanged += answers[d, i] == original[i]
  total = 10 * len(records)
  return {"questions": len(records), "answers": total,
          "answers_the_count": round(right / max(total, 1), 4),
          "answers_the_most_frequent_digits_multiplicity":
              round(repeats / max(total, 1), 4),
          "answer_unchanged": round(unchanged / max(total, 1), 4)}


def answer(run, state, batch, tokenizer, answers) -> list[str]:
  """The answers to one batch: greedy decoding or the classifier's arg max."""
  out = jax.device_get(run.predict(state, batch))
  if "tokens" in out:
    return tokenizer.decode(np.asarray(out["tokens"]))
  return [answers[k] for k in np.argmax(out["logits"], -1)]


def probe(config, workdir: str, split: str) -> dict:
  run, state = evaluate.restore_result(config, workdir)
  tokenizer = pipeline.text_tokenizer(config)
  field = config.text.fields.to_dict()["question"]
  answers = tuple(config.evaluators.vqa.to_dict().get("answers", ()))
  source = run.data_source(split)
  records = source.__getitems__(list(range(len(source))))
  per_digit = [[] for _ in range(10)]
  sharding = parallel.batch_sharding(run.mesh)
  for batch in run.eval_batches(source):  # every example once, in order
    host = jax.device_get(batch)
    rows = np.flatnonzero(host["valid"] & (host["family"] == COUNT))
    if not rows.size:
      continue
    for d in range(10):
      ids = substitute_digit(host[field], d, tokenizer.offset)
      probed = {**batch, field: parallel.put_batch({field: ids},
                                                   sharding)[field]}
      out = answer(run, state, probed, tokenizer, answers)
      per_digit[d] += [out[i] for i in rows]
  count = [r for r in records if r["family"] == COUNT]
  return score(np.array(per_digit), count)


PROGRAM = cli.Program(
    "digit_probe", "usage: python experiments/digits_qa/digit_probe.py "
    "--config configs/digits_qa.py:ARGS --workdir DIR [--split test]",
    {"--config": "the run's config", "--workdir": "the run's work directory",
     "--split": "the split whose counting questions are asked (default test)"},
    required=("--config", "--workdir"))


def run_probe(argv):
  config, options = cli.parse_config_and_flags(argv, PROGRAM)
  print(json.dumps(probe(config, options["workdir"],
                         options.get("split", "test"))))


if __name__ == "__main__":
  sys.exit(cli.main(run_probe, PROGRAM))
