"""Checkpoints: the train state and the data iterator's position, together.

An orbax CheckpointManager under `<workdir>/checkpoints` keeps the last
`keep` steps. Each checkpoint holds two items: `state` (params, optimizer
state, batch statistics, step and RNG key, restored straight into their
shardings) and `data` (the grain iterator state as JSON). orbax writes each
step to a temporary directory and renames it when complete, so a process
killed mid-write leaves the previous checkpoint as the latest.

SIGINT (Ctrl-C, or `mmjax.sweep` stopping a run) is held while a save is
dispatched or awaited and delivered right after: an interrupt inside orbax's
`save` leaves its background threads half started, after which `close`
hangs (seen with orbax-checkpoint 0.12.8). The save completes, then the run
stops.
"""

import contextlib
import pathlib
import signal
import threading

import jax
import orbax.checkpoint as ocp


@contextlib.contextmanager
def sigint_held():
  """Holds SIGINT until the block ends, then delivers it as if it came then.

  Outside the main thread (where Python handles no signals) it does nothing.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []
  previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if received:
    signal.raise_signal(signal.SIGINT)


class Checkpointer:
  """Saves and restores (train state, data iterator state) pairs by step."""

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict):
    """Starts an asynchronous save of `state` and `data_state` at `step`."""
    with sigint_held():
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state)))

  def restore(self, abstract_state, step: int | None = None):
    """Restores (state, data_state) at `step` (default: latest) into the
    shapes, dtypes and shardings of `abstract_state`."""
    step = self._manager.latest_step() if step is None else step
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def wait(self):
    """Blocks until pending saves are on disk."""
    with sigint_held():
      self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
