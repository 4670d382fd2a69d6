"""Checkpoint selection: the run's result is its best evaluation's state.

  config.select_best.metric = "eval/avmnist_val/classification/accuracy"
  config.select_best.mode = "max"   # or "min" (a loss)

With a metric set, every evaluation in training offers its train state to
`BestCheckpoint`, an orbax CheckpointManager under `<workdir>/best` that
keeps the one state with the best value of the metric (orbax's `best_fn`,
`max_to_keep=1`; the metric is stored with it, so a resumed run knows the
best so far). At the end the trainer evaluates the kept state, and that is
the run's final row, with `selected_step` naming its step: MultiBench's
protocol (keep the model of the epoch with the best validation accuracy,
report its test accuracy; Liang et al. 2021, `training_structures/
Supervised_Learning.py`). Select on a validation split, never on test.

With no metric (`""`, every config's default) `NoSelection` keeps nothing
and the final row is the last state's, as before.
"""

import pathlib

import jax
import orbax.checkpoint as ocp

from mmjax import results
from mmjax.errors import UsageError

MODES = ("max", "min")


def check(config):
  """UsageError unless `config.select_best` names a mode and, if a metric,
  one of the run's evaluation splits ("eval/<dataset>[_<split>]/...")."""
  spec = config.get("select_best")
  if spec is None or not spec.metric:
    return
  if spec.mode not in MODES:
    raise UsageError(f"config key 'select_best.mode' is {spec.mode!r}; "
                     "known: max, min")
  prefixes = [f"eval/{results.eval_name(config.dataset, split)}/"
              for split in config.eval_splits]
  if not spec.metric.startswith(tuple(prefixes)):
    raise UsageError(
        f"config key 'select_best.metric' is {spec.metric!r}, which is not a "
        f"metric of the run's eval splits (names start with "
        f"{', '.join(prefixes)})")


class NoSelection:
  """The final state is the last one."""
  best_step = None

  def observe(self, step: int, state, row: dict):
    del step, state, row

  def selected(self, state):
    return state

  def close(self):
    pass


class BestCheckpoint:
  """Keeps the train state of the evaluation with the best `metric`.

  `observe(step, state, row)` after each evaluation (`row` its metrics);
  `selected(target)` the best state so far, restored into the shapes and
  shardings of `target`.
  """

  def __init__(self, workdir: str, metric: str, mode: str = "max"):
    self.metric = metric
    self.directory = pathlib.Path(workdir).absolute() / "best"
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: metrics[metric],
            best_mode=mode, create=True),
        item_names=("state",))

  @property
  def best_step(self) -> int | None:
    return self._manager.best_step()

  def observe(self, step: int, state, row: dict):
    if self.metric not in row:
      known = ", ".join(sorted(k for k in row if k.startswith("eval/")))
      raise UsageError(f"config key 'select_best.metric': the evaluation has "
                       f"no {self.metric!r}; it has {known}")
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state)),
        metrics={self.metric: float(row[self.metric])})
    self._manager.wait_until_finished()

  def selected(self, state):
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        state)
    restored = self._manager.restore(self.best_step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return restored["state"]

  def close(self):
    self._manager.close()


def restore_selected(config, workdir: str, state):
  """The state `config.select_best` selected in `workdir` (restored into the
  shapes and shardings of `state`), or `state` itself when the config
  selects nothing or the run has kept no selection yet."""
  spec = config.get("select_best")
  if (spec is None or not spec.metric
      or not (pathlib.Path(workdir) / "best").is_dir()):
    return state
  selector = BestCheckpoint(workdir, spec.metric, spec.mode)
  try:
    return state if selector.best_step is None else selector.selected(state)
  finally:
    selector.close()


def build(config, workdir: str):
  """`BestCheckpoint` for `config.select_best.metric`, else `NoSelection`."""
  spec = config.get("select_best")
  if spec is None or not spec.metric:
    return NoSelection()
  return BestCheckpoint(workdir, spec.metric, spec.mode)
