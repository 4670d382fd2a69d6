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

It also holds MultiBench's robustness summaries of accuracy curves read from
results (`curve_from_results`, `relative_robustness`,
`effective_robustness`, `minmax_normalize`), which the `robustness`
evaluator reports and notebooks compare across runs.
"""

import json
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

FINAL_KEY = "wall_time_s"  # only the final evaluation row has it


def write_atomically(path: str | os.PathLike, text: str):
  """Writes `text` to `path` through a temporary file and a rename, so that a
  process killed meanwhile leaves the old file or the new, never a torn one."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def eval_name(dataset: str, split: str) -> str:
  """The `<dataset>` of metric names: "coco_mini", "avmnist_clean_val".

  The dataset name without "tfds:" or version, "/" read as "_", and the split
  appended unless it is "test". A webdataset pattern ("wds:/data/cc3m/
  {split}/{00000..00331}.tar") is named by its last directory without
  braces or wildcards ("cc3m").
  """
  if dataset.startswith("wds:"):
    parts = [p for p in pathlib.PurePath(dataset[4:]).parent.parts
             if not any(c in p for c in "{}*?[")]
    name = parts[-1] if parts and parts[-1] != "/" else "wds"
    return name if split == "test" else f"{name}_{split}"
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


def has_eval_row(rows: Sequence[dict], step: int) -> bool:
  """Whether an evaluation (a row with "eval/..." metrics) at `step` is
  among `rows`."""
  return any(r.get("step") == step and any(k.startswith("eval/") for k in r)
             for r in rows)


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


# ------------------------------------- robustness of result curves (MultiBench)


def level_positions(levels: Sequence[float] | None, n: int) -> np.ndarray:
  """Levels [n] -> positions on [0, 1] (affine; None: evenly spaced)."""
  if n < 2:
    raise ValueError(f"a robustness curve needs at least 2 levels, got {n}")
  if levels is None:
    return np.linspace(0.0, 1.0, n)
  x = np.asarray(levels, np.float64)
  if x.shape != (n,):
    raise ValueError(f"{x.size} levels for a curve of {n} accuracies")
  if np.any(np.diff(x) <= 0):
    raise ValueError(f"levels must be strictly increasing, got {list(levels)}")
  return (x - x[0]) / (x[-1] - x[0])


def relative_robustness(curve: Sequence[float],
                        levels: Sequence[float] | None = None) -> float:
  """MultiBench's relative robustness: the area under an accuracy curve.

  curve [n]: accuracies at increasing corruption levels, the first clean.
  levels [n] (optional): the levels, mapped affinely onto [0, 1]; None means
  evenly spaced on [0, 1]. The trapezoid rule over those positions: on the
  11-level grid 0, 0.1, ..., 1 this is `relative_robustness_helper` of
  MultiBench's eval_scripts/robustness.py (Liang et al., NeurIPS 2021), before
  their min-max normalisation across methods (`minmax_normalize`).
  """
  a = np.asarray(curve, np.float64)
  x = level_positions(levels, a.size)
  return float(np.sum((x[1:] - x[:-1]) * (a[1:] + a[:-1]) / 2))


def effective_robustness(curve: Sequence[float],
                         baseline_curve: Sequence[float]) -> float:
  """MultiBench's effective robustness of `curve` against `baseline_curve`.

  curve, baseline_curve [n]: two models' accuracies at the same increasing
  levels, the first clean; MultiBench's baseline is late fusion. The baseline
  is shifted to the model's clean accuracy, beta = baseline + (curve_0 -
  baseline_0), and the result is sum_i (curve_i - beta_i): positive when the
  model loses less accuracy than the baseline as the corruption grows. This
  is `effective_robustness_helper` of MultiBench's eval_scripts/robustness.py
  (Liang et al., NeurIPS 2021), a sum over levels (so it scales with their
  number), before their min-max normalisation across methods.
  """
  f = np.asarray(curve, np.float64)
  lf = np.asarray(baseline_curve, np.float64)
  if f.shape != lf.shape or f.ndim != 1 or f.size < 2:
    raise ValueError(f"curves must be 1-D, of equal length >= 2, taken at the "
                     f"same levels; got {f.shape} and {lf.shape}")
  beta = lf + (f[0] - lf[0])
  return float(np.sum(f - beta))


def minmax_normalize(scores: Mapping[str, float],
                     higher_is_better: bool = True) -> dict[str, float]:
  """Scores of several models -> (s - min) / (max - min), as MultiBench's
  `maxmin_normalize` ranks methods on its leaderboard (negated first when
  lower is better). Needs two distinct scores."""
  names = list(scores)
  s = np.asarray([scores[k] for k in names], np.float64)
  if not higher_is_better:
    s = -s
  spread = s.max() - s.min() if s.size else 0.0
  if spread == 0:
    raise ValueError(f"min-max normalisation needs two distinct scores, got "
                     f"{dict(scores)}")
  return {k: float(v) for k, v in zip(names, (s - s.min()) / spread)}


def curve_from_results(results: Mapping[str, float], modality: str,
                       corruption: str, prefix: str = ""
                       ) -> tuple[list[float], list[float]]:
  """(levels, accuracies) of one curve from a metrics dict, levels ascending.

  Reads the keys `<prefix><modality>/<corruption>/<level>/accuracy`, e.g.
  prefix "eval/avmnist/robustness/" for the trainer's metric names.
  """
  head = f"{prefix}{modality}/{corruption}/"
  points = []
  for key, value in results.items():
    if key.startswith(head) and key.endswith("/accuracy"):
      level = key[len(head):-len("/accuracy")]
      if "/" not in level:
        points.append((float(level), float(value)))
  if not points:
    raise KeyError(f"no {head}<level>/accuracy in the results")
  points.sort()
  return [p[0] for p in points], [p[1] for p in points]
