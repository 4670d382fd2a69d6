"""What a digits_qa model answers to counting questions, against the grids.

  python experiments/digits_qa/count_errors.py --config configs/digits_qa.py:ARGS \
      --generations DIR/generations/test_step6000_greedy.jsonl [--split test]

`--generations` is the JSONL that `python -m mmjax.generate --split SPLIT`
wrote for the run (one line per example of SPLIT, in order); `--config` is
the run's config, which names the dataset. For the `count` family ("how many
times does 4 appear?") it prints one JSON object: the confusion of true count
(rows) against the generated answer (columns), and how often the answer is
the true count and how often it is the multiplicity of the grid's most
frequent digit, whatever digit the question names. A model that answers the
second has learnt to count repeats without binding the question's digit to
the cells.
"""

import collections
import json
import sys

from mmjax import cli
from mmjax.data import pipeline
from mmjax.data.builders import digits_qa
from mmjax.errors import UsageError

COUNT = digits_qa.FAMILIES.index("count")


def count_errors(generations: list[str], records: list[dict]) -> dict:
  """generations[i] answers records[i] (with "family", "digits", "answer")."""
  counts = [str(c) for c in range(5)]
  confusion = {c: collections.Counter() for c in counts}
  correct = most_frequent = total = 0
  for generation, record in zip(generations, records, strict=True):
    if record["family"] != COUNT:
      continue
    answer = record["answer"].decode()
    repeats = max(collections.Counter(record["digits"].tolist()).values())
    confusion[answer][generation] += 1
    correct += generation == answer
    most_frequent += generation == str(repeats)
    total += 1
  return {"questions": total,
          "confusion": {c: [confusion[c][g] for g in counts] for c in counts},
          "answers_the_count": round(correct / max(total, 1), 4),
          "answers_the_most_frequent_digits_multiplicity":
              round(most_frequent / max(total, 1), 4)}


PROGRAM = cli.Program(
    "count_errors", "usage: python experiments/digits_qa/count_errors.py "
    "--config configs/digits_qa.py:ARGS --generations FILE.jsonl "
    "[--split test]",
    {"--config": "the run's config (it names the dataset)",
     "--generations": "the JSONL of python -m mmjax.generate --split SPLIT",
     "--split": "the split the generations answer (default test)"},
    required=("--config", "--generations"))


def run(argv):
  config, options = cli.parse_config_and_flags(argv, PROGRAM)
  split, path = options.get("split", "test"), options["generations"]
  try:
    with open(path) as f:
      generations = [json.loads(line)["generation"] for line in f]
  except (OSError, ValueError, KeyError) as e:
    raise UsageError(f"--generations {path}: not a generations JSONL ({e})"
                     ) from e
  source = pipeline.data_source(config, split)
  if len(generations) != len(source):
    raise UsageError(f"--generations {path}: {len(generations)} lines, but "
                     f"split {split} has {len(source)} examples")
  records = source.__getitems__(list(range(len(source))))
  print(json.dumps(count_errors(generations, records)))


if __name__ == "__main__":
  sys.exit(cli.main(run, PROGRAM))
