"""Checkpoints: the train state and the data iterator's position, together.

An orbax CheckpointManager under `<workdir>/checkpoints` keeps the last
`keep` steps. Each checkpoint holds two items: `state` (params, optimizer
state, batch statistics, step and RNG key, restored straight into their
shardings) and `data` (the grain iterator state as JSON). orbax writes each
step to a temporary directory (`<step>.orbax-checkpoint-tmp`) and renames it
when complete, so a process killed mid-write leaves the previous checkpoint
as the latest.

Restoring. `restore` checks the stored tree against the new state first (a
checkpoint of another model is a UsageError naming the first parameter that
differs), then tries the latest step; a step that cannot be read (truncated
or missing files, garbage bytes) is reported through `warn` and the next
older step is tried, down to the oldest; if none can be restored it is a
UsageError and nothing on disk changes. Checkpoints written before the train
state's field `imbalance` was renamed `method_state` restore into
`method_state` (see LEGACY_FIELDS).

Unrestorable steps are kept, never deleted: orbax's CheckpointManager would
otherwise (a) skip every save at a step at or below its latest step, so a
run that fell back from step 2000 to 1000 would save nothing until step
2000 had passed, and (b) delete the unrestorable step once `keep` newer
steps exist (max_to_keep counts every step directory it knows). So after a
fallback the unrestorable steps are dropped from the manager's list (orbax
neither counts nor deletes them) and recorded in
`checkpoints/unrestorable.json`, so later runs leave them alone too. Nothing
is moved, except when the run reaches an unrestorable step's number again:
to save that step, `checkpoints/<step>` is renamed `<step>.unrestorable`
(orbax ignores that name) with a warning.

Saving is asynchronous. A failed save (disk full, directory gone, ...)
surfaces at the next `save` or at `wait`/`close` as a UsageError naming the
step and the latest good checkpoint, which stays on disk and restorable:
orbax deletes old steps only after the new one is complete.

SIGINT (Ctrl-C, or `mmjax.sweep` stopping a run) is held while a save is
dispatched or awaited and delivered right after: an interrupt inside orbax's
`save` leaves its background threads half started, after which `close`
hangs (seen with orbax-checkpoint 0.12.8). The save completes, then the run
stops.
"""

import contextlib
import dataclasses
import json
import pathlib
import signal
import sys
import threading
from typing import Callable

import jax
import orbax.checkpoint as ocp

from mmjax.errors import UsageError

# Train state field -> its name in checkpoints written before it was renamed.
LEGACY_FIELDS = {"method_state": "imbalance"}

UNRESTORABLE_FILE = "unrestorable.json"


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


def _warn_stderr(message: str):
  print(f"warning: {message}", file=sys.stderr)


def one_line(e: BaseException, limit: int = 200) -> str:
  """An exception as `Type: first line`, without tensorstore's spec dump."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = text.split(" [tensorstore_spec")[0]
  if len(text) > limit:
    text = text[:limit - 3] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _key_name(key) -> str:
  for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path) -> str:
  """A jax key path as orbax names it: "params.dense.kernel"."""
  return ".".join(_key_name(k) for k in path)


def renamed(name: str, renames: dict) -> str:
  """A stored leaf's name with its legacy field renamed to the target's
  (`renames`: {target field: stored field})."""
  back = {old: new for new, old in renames.items()}
  head, dot, rest = name.partition(".")
  return back.get(head, head) + dot + rest


def flat_shapes(tree) -> dict[str, tuple | None]:
  """{"params.dense.kernel": shape} for each leaf, named as orbax names them
  (dataclass fields, dict keys and sequence indices joined with dots)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_name(path):
          None if getattr(leaf, "shape", None) is None else tuple(leaf.shape)
          for path, leaf in leaves}


def _pytree_fields(x) -> list[str] | None:
  """A dataclass's pytree field names (flax static fields left out)."""
  if not dataclasses.is_dataclass(x) or isinstance(x, type):
    return None
  return [f.name for f in dataclasses.fields(x)
          if f.metadata.get("pytree_node", True)]


def read_params(workdir: str) -> dict:
  """The parameters of the latest checkpoint of the run in `workdir`, as
  stored (host arrays; no model needed): for loading a trained part of one
  run into another (`experiment.load_pretrained`, "run:<workdir>").
  UsageError if there is none."""
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
  if not directory.is_dir():
    raise UsageError(f"no checkpoints in {directory}")
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False,
                                                      read_only=True),
      item_names=("state", "data"))
  try:
    step = manager.latest_step()
    if step is None:
      raise UsageError(f"no checkpoints in {directory}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
  finally:
    manager.close()
  return jax.device_get(restored["state"]["params"])


class Checkpointer:
  """Saves and restores (train state, data iterator state) pairs by step.

  `warn(message)` reports a checkpoint that could not be restored (default:
  `warning: ...` on stderr). After `restore`, `restored_step` is the step
  restored.
  """

  def __init__(self, workdir: str, keep: int = 3,
               warn: Callable[[str], None] | None = None):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.warn = warn or _warn_stderr
    self.restored_step: int | None = None
    self._pending: int | None = None  # step of the save in flight
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data"))
    self._unrestorable = self._read_unrestorable()
    self._forget(self._unrestorable)

  # ------------------------------------------------------- unrestorable ---

  def _read_unrestorable(self) -> dict[int, str]:
    path = self.directory / UNRESTORABLE_FILE
    try:
      return {int(k): v for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
      return {}

  def _write_unrestorable(self):
    if jax.process_index() != 0:
      return
    path = self.directory / UNRESTORABLE_FILE
    if self._unrestorable:
      tmp = path.with_name(path.name + ".tmp")
      tmp.write_text(json.dumps(
          {str(k): v for k, v in sorted(self._unrestorable.items())},
          indent=1) + "\n")
      tmp.replace(path)
    elif path.exists():
      path.unlink()

  def _forget(self, steps):
    """Drops steps from the manager's list (not from disk): orbax neither
    counts them against `keep`, deletes them, nor skips saves below them."""
    steps = set(steps)
    if steps:
      self._manager._checkpoints.delete_if(lambda info: info.step in steps)  # pylint: disable=protected-access

  def _set_aside(self, step: int):
    """Renames unrestorable `checkpoints/<step>` so that `step` can be saved."""
    source = self.directory / str(step)
    if jax.process_index() == 0 and source.exists():
      target, n = self.directory / f"{step}.unrestorable", 1
      while target.exists():
        n += 1
        target = self.directory / f"{step}.unrestorable{n}"
      source.rename(target)
      self.warn(f"checkpoint step {step} in {self.directory} could not be "
                f"restored earlier; renamed it {target.name} (kept) to save "
                f"step {step} again")
    del self._unrestorable[step]
    self._write_unrestorable()

  # ----------------------------------------------------------- restore ---

  def latest_step(self) -> int | None:
    """The latest step on disk (unrestorable ones left out)."""
    return self._manager.latest_step()

  def _renames(self, stored_tree, target) -> dict[str, str]:
    """{target field: stored key} for LEGACY_FIELDS found in `stored_tree`."""
    fields = _pytree_fields(target)
    if fields is None or not isinstance(stored_tree, dict):
      return {}
    return {new: old for new, old in LEGACY_FIELDS.items()
            if new in fields and old not in fields
            and new not in stored_tree and old in stored_tree}

  def _check_fits(self, step: int, stored_tree, target, renames: dict):
    """UsageError unless the stored tree has the target's paths and shapes."""
    stored = {renamed(name, renames): shape
              for name, shape in flat_shapes(stored_tree).items()}
    expected = flat_shapes(target)
    problem = None
    for path, shape in expected.items():
      if path not in stored:
        problem = (f"this model has {path} (shape {shape}), which step {step} "
                   "does not store")
      elif None not in (shape, stored[path]) and stored[path] != shape:
        problem = (f"step {step} stores {path} with shape {stored[path]} but "
                   f"this model expects {shape}")
      if problem:
        break
    if problem is None:
      extra = [p for p in stored if p not in expected]
      if extra:
        problem = (f"step {step} stores {extra[0]} (shape {stored[extra[0]]}), "
                   "which this model does not have")
    if problem:
      raise UsageError(
          f"{self.directory} holds checkpoints of a different model: "
          f"{problem}; use another --workdir")

  def _restore_step(self, step: int, target):
    # A checkpoint that is not what it should be raises here (any exception:
    # the caller tries an older step); a different model is a UsageError.
    handler = ocp.StandardCheckpointHandler()
    try:
      stored_tree = handler.metadata(self.directory / str(step) / "state").tree
    finally:
      handler.close()
    renames = self._renames(stored_tree, target)
    self._check_fits(step, stored_tree, target, renames)
    # Restored in the stored tree's own structure, which may differ from the
    # target's where no array lives (an optimizer state that optax.masked
    # now wraps, a field that was renamed), each array in the shape, dtype
    # and sharding of the target's array at the same path; then placed into
    # the target's structure by path.
    paths, treedef = jax.tree_util.tree_flatten_with_path(target)
    wanted = {path_name(path): leaf for path, leaf in paths}
    item = jax.tree_util.tree_map_with_path(
        lambda path, _: wanted[renamed(path_name(path), renames)],
        stored_tree)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(item),
        data=ocp.args.JsonRestore()))
    state, data_state = restored["state"], restored["data"]
    if data_state is None:
      raise ValueError("the data iterator state is missing")
    arrays = {renamed(path_name(path), renames): leaf for path, leaf in
              jax.tree_util.tree_flatten_with_path(state)[0]}
    state = jax.tree_util.tree_unflatten(treedef, [arrays[p] for p in wanted])
    return state, data_state

  def restore(self, abstract_state, step: int | None = None):
    """Restores (state, data_state) into the shapes, dtypes and shardings of
    `abstract_state`, from `step` or else the latest step that can be read,
    trying older ones in turn; sets `self.restored_step`."""
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        abstract_state)
    steps = ([step] if step is not None else
             sorted(self._manager.all_steps(), reverse=True))
    if not steps:
      raise UsageError(f"no checkpoints in {self.directory}")
    failed = {}
    for s in steps:
      try:
        state, data_state = self._restore_step(s, target)
      except UsageError:
        raise
      except Exception as e:  # pylint: disable=broad-exception-caught
        failed[s] = one_line(e)
        older = [t for t in steps if t < s]
        then = f"trying step {older[0]}" if older else "no older step to try"
        self.warn(f"checkpoint step {s} in {self.directory} cannot be "
                  f"restored ({failed[s]}); {then}")
        continue
      if failed:
        self._unrestorable.update(failed)
        self._forget(failed)
        self._write_unrestorable()
      self.restored_step = s
      return state, data_state
    tried = ", ".join(str(s) for s in steps)
    raise UsageError(
        f"no checkpoint in {self.directory} can be restored (tried step"
        f"{'s' if len(steps) > 1 else ''} {tried}; "
        f"step {steps[0]}: {failed[steps[0]]}); nothing was changed there: "
        "move them away or use another --workdir to start afresh")

  # -------------------------------------------------------------- save ---

  def _failed(self, step: int, e: Exception) -> UsageError:
    # orbax forgets the failed step and, at dispatch, the steps that the
    # failed save would have replaced; those are still on disk.
    self._manager.reload()
    self._forget(self._unrestorable)
    good = self._manager.latest_step()
    where = (f"the latest good checkpoint is step {good} in {self.directory}"
             if good is not None else f"there is no checkpoint in "
             f"{self.directory} to resume from")
    return UsageError(
        f"checkpoint save at step {step} failed: {one_line(e)}; {where}")

  def _finish_pending(self):
    """Waits for the save in flight; UsageError if it failed."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._failed(step, e) from e

  def save(self, step: int, state, data_state: dict):
    """Starts an asynchronous save of `state` and `data_state` at `step`,
    once the previous save is complete (UsageError if that one failed)."""
    with sigint_held():
      self._finish_pending()
      if step in self._unrestorable:
        self._set_aside(step)
      try:
        saved = self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state)))
      except Exception as e:  # pylint: disable=broad-exception-caught
        raise self._failed(step, e) from e
      if saved:
        self._pending = step

  def wait(self):
    """Blocks until pending saves are on disk; UsageError if one failed."""
    with sigint_held():
      self._finish_pending()

  def close(self):
    """Waits for the save in flight (UsageError if it failed) and closes."""
    try:
      self.wait()
    finally:
      self._manager.close()
