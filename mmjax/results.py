"""Run results: metric names, reading metrics.jsonl, the finished-run rule,
and a sweep's results table.

The one place that knows how results are laid out on disk, used by the
metric writer, `mmjax.sweep` and every notebook. Imports neither jax nor a
subprocess runner, so a notebook that reads results starts fast.

  DIR/metrics.jsonl   one JSON object per logged step: {"step": N, ...};
                      evaluation rows carry `eval/<dataset>/<evaluator>/
                      <metric>` (`metric_name`), the final one `wall_time_s`.
  DIR/checkpoints/N   the orbax checkpoint of step N.
  SWEEP/results.json  a sweep's rows, one per point (`load_results`).
"""

import json
import os
import pathlib
from collections.abc import Sequence

FINAL_KEY = "wall_time_s"  # only the final evaluation row has it


def eval_name(dataset: str, split: str) -> str:
  """The `<dataset>` of metric names: "coco_mini", "avmnist_clean_val".

  The dataset name without "tfds:" or version, "/" read as "_", and the split
  appended unless it is "test".
  """
  name = dataset.removeprefix("tfds:").partition(":")[0].replace("/", "_")
  return name if split == "test" else f"{name}_{split}"


def metric_name(dataset: str, split: str, evaluator: str, name: str) -> str:
  """"eval/<dataset>/<evaluator>/<name>", `<dataset>` from `eval_name`."""
  return f"eval/{eval_name(dataset, split)}/{evaluator}/{name}"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The rows of a jsonl file ([] if it does not exist). A line that does not
  parse (the torn last line a killed run leaves) is left out."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return rows


def has_final_row(rows: Sequence[dict], total_steps: int) -> bool:
  """Whether the final evaluation (the row with `wall_time_s` at
  `total_steps`) is among `rows`."""
  return any(r.get("step") == total_steps and FINAL_KEY in r for r in rows)


def is_finished(run_dir: str | os.PathLike, total_steps: int) -> bool:
  """A run is finished when it wrote its final metrics row and its last
  checkpoint."""
  run_dir = pathlib.Path(run_dir)
  return (has_final_row(read_jsonl(run_dir / "metrics.jsonl"), total_steps)
          and (run_dir / "checkpoints" / str(total_steps)).is_dir())


def last_value(rows: Sequence[dict], key: str):
  """The last value of `key` over `rows`, None if no row has it."""
  values = [r[key] for r in rows if key in r]
  return values[-1] if values else None


def load_results(workdir: str | os.PathLike) -> list[dict]:
  """The rows of a sweep's results.json, one dict per point."""
  return json.loads((pathlib.Path(workdir) / "results.json").read_text())


def metric(row: dict, name: str, dataset: str | None = None):
  """A results row's `eval/<dataset>/<name>`, e.g. metric(row,
  "classification/accuracy"); `dataset` may be left out when the row has
  that metric for one dataset only. KeyError when absent or ambiguous."""
  keys = [k for k in row if k.startswith("eval/")
          and k.split("/", 2)[2:] == [name]
          and dataset in (None, k.split("/")[1])]
  if len(keys) != 1:
    raise KeyError(f"{name!r}{f' of {dataset!r}' if dataset else ''}: "
                   f"{'ambiguous, ' + ', '.join(keys) if keys else 'absent'} "
                   f"in the row of {row.get('name')!r}")
  return row[keys[0]]


def cell(value, spec: str = ".0f") -> str:
  """A table cell of a results value; "-" where it is None (a rate such as
  examples_per_sec when a run logged too few intervals to measure one)."""
  return "-" if value is None else format(value, spec)
