"""Run logs: config.json, metrics.jsonl, TensorBoard events, progress, MFU.

(Named `metric_writers` rather than `logging` so that it never shadows the
standard library's `logging` module.)
"""

import json
import pathlib
import sys
import time

import jax
from tensorboardX import SummaryWriter

from mmjax import results

def compiled_flops(compiled, num_devices: int) -> float:
  """FLOPs of one call of a compiled jax function over all `num_devices`.

  XLA's cost analysis of an SPMD-partitioned program counts one device's
  share, so it is multiplied by the number of devices.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float((analysis or {}).get("flops", float("nan"))) * num_devices


def _jsonable(value):
  return value.item() if hasattr(value, "item") else value


class MetricWriter:
  """Writes metric rows to metrics.jsonl and TensorBoard, and shows progress.

  On a terminal, a progress bar with ETA; otherwise one plain line per logged
  row. `resume(step)` drops rows logged after `step` by a run that stopped
  before checkpointing them, so a resumed run's log has no duplicates.
  """

  def __init__(self, workdir: str, total_steps: int, config_dict: dict | None = None):
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.main = jax.process_index() == 0
    self.total_steps = total_steps
    self._bar = None
    self._path = self.workdir / "metrics.jsonl"
    if not self.main:
      return
    if config_dict is not None:
      results.write_atomically(self.workdir / "config.json",
                               json.dumps(config_dict, indent=2) + "\n")
    self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
    if sys.stderr.isatty():
      import tqdm
      self._bar = tqdm.tqdm(total=total_steps, unit="step", dynamic_ncols=True)

  def resume(self, step: int):
    """Keeps only rows up to `step` (and drops a torn last line) and moves
    the progress bar there."""
    if not self.main:
      return
    if self._path.exists():
      rows = [r for r in results.read_jsonl(self._path) if r["step"] <= step]
      results.write_atomically(self._path,
                               "".join(json.dumps(r) + "\n" for r in rows))
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def has_final_row(self, total_steps: int) -> bool:
    """Whether the final evaluation row was written (`results.has_final_row`);
    every process reads the same file."""
    return results.has_final_row(results.read_jsonl(self._path), total_steps)

  def has_eval_row(self, step: int) -> bool:
    """Whether an evaluation at `step` was written (`results.has_eval_row`)."""
    return results.has_eval_row(results.read_jsonl(self._path), step)

  def write(self, step: int, metrics: dict):
    if not self.main:
      return
    row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
    with self._path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    for key, value in row.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()
    text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in row.items() if k != "step")
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix_str(text[:120], refresh=True)
    else:
      print(f"[{time.strftime('%H:%M:%S')}] step {step}/{self.total_steps} "
            f"{text}", flush=True)

  def info(self, text: str):
    """A plain message that does not break the progress bar."""
    if not self.main:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self):
    if self.main:
      self._tb.close()
      if self._bar is not None:
        self._bar.close()
