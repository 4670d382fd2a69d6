"""A run's work directory: one run at a time, and resuming only what fits.

`RunLock(workdir)` holds an advisory `fcntl.flock` on `<workdir>/.lock` for
as long as the run lives; the kernel drops it when the process ends, however
it ends (SIGKILL included), so a killed run never leaves it stuck. The file
holds the holder's pid, for the message a second run gets. Process i > 0 of
a multi-host run locks `.lock.<i>`, so that each process of a second run on
the same directory finds its counterpart holding the lock.

`check_resume(workdir, config)` compares a new config with the one saved in
`<workdir>/config.json`: keys that change the model, the data or the
optimisation refuse the resume; keys that only change how the run reports,
evaluates or checkpoints (and a larger `total_steps`) are allowed and
returned for the caller to log.

Standard library only: cheap to import (flax.traverse_util would import jax).
"""

import fcntl
import json
import os
import pathlib

from mmjax.errors import UsageError

LOCK_FILE = ".lock"

# Keys that change neither the model nor the data: resuming with new values
# is fine. A key allows itself and everything under it ("evaluators.x.y").
ALLOWED_KEYS = (
    "eval_every", "log_every", "checkpoint_every", "keep_checkpoints",
    "eval_batch_size", "eval_splits", "evaluators", "data_dir", "source_dir",
    "data_workers", "peak_flops", "generation",
)
MAX_LISTED = 5
_MISSING = object()


def check_directory(path, what: str = "--workdir"):
  """Creates directory `path` if needed; UsageError naming `what` (the flag
  or config key) if it is a file or cannot be created or written."""
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise UsageError(f"{what} {path} is a file, not a directory")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UsageError(f"{what} {path} cannot be created: "
                     f"{e.strerror or e}") from None
  if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
    raise UsageError(f"{what} {path} is not readable and writable")


class RunLock:
  """`with RunLock(workdir): ...`: UsageError if another run holds it."""

  def __init__(self, workdir, process_index: int = 0):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / (f"{LOCK_FILE}.{process_index}"
                                if process_index else LOCK_FILE)
    self._fd = None

  def acquire(self):
    check_directory(self.workdir)
    # No O_TRUNC: the holder's pid stays readable until the lock is ours.
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
      os.close(fd)
      pid = f"pid {holder}" if holder.isdigit() else "pid unknown"
      raise UsageError(
          f"{self.workdir} is in use by another run ({pid}); wait for it or "
          "choose another --workdir") from None
    except BaseException:
      os.close(fd)
      raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    self._fd = fd
    return self

  def release(self):
    if self._fd is not None:
      fd, self._fd = self._fd, None
      os.close(fd)  # drops the lock; the file stays (removing it would race)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}, "c": {}} -> {"a.b": 1}: empty dicts vanish, as with
  flax.traverse_util.flatten_dict(tree, sep=".")."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _allowed(key: str, old, new) -> bool:
  if old is _MISSING:  # a key added to mmjax after the run began
    return True
  if key == "total_steps":
    return (isinstance(old, int) and isinstance(new, int)
            and not isinstance(old, bool) and new > old)
  return any(key == a or key.startswith(a + ".") for a in ALLOWED_KEYS)


def _show(value) -> str:
  return "(absent)" if value is _MISSING else json.dumps(value, default=str)


def compare_configs(old: dict, new: dict) -> tuple[list[str], list[str]]:
  """The keys (dotted paths) whose values differ, as (refused, allowed)."""
  old_flat, new_flat = flatten(old), flatten(new)
  refused, allowed = [], []
  for key in sorted(old_flat.keys() | new_flat.keys()):
    a, b = old_flat.get(key, _MISSING), new_flat.get(key, _MISSING)
    if a is _MISSING or b is _MISSING or a != b or type(a) is not type(b):
      if a is not _MISSING and b is not _MISSING and a == b and (
          {type(a), type(b)} <= {int, float}):
        continue  # 1 and 1.0
      (allowed if _allowed(key, a, b) else refused).append(key)
  return refused, allowed


def _json_safe(config: dict) -> dict:
  return json.loads(json.dumps(config, default=str))


def check_resume(workdir, config: dict) -> list[str]:
  """UsageError if `config` differs from `<workdir>/config.json` in a key
  that matters; else the harmless differences as `key: old -> new` lines.
  No config.json (a fresh work directory): no differences."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    return []
  try:
    old = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise UsageError(f"{path} cannot be read ({e}); use another --workdir "
                     "to start afresh") from None
  if not isinstance(old, dict):
    raise UsageError(f"{path} is not a config (a JSON object); use another "
                     "--workdir to start afresh")
  new = _json_safe(config)
  refused, allowed = compare_configs(old, new)
  old_flat, new_flat = flatten(old), flatten(new)

  def line(key):
    return (f"{key}: {_show(old_flat.get(key, _MISSING))} -> "
            f"{_show(new_flat.get(key, _MISSING))}")

  if refused:
    shown = "; ".join(line(k) for k in refused[:MAX_LISTED])
    more = (f" (and {len(refused) - MAX_LISTED} more)"
            if len(refused) > MAX_LISTED else "")
    raise UsageError(
        f"{workdir} holds a run with another config: {shown}{more}; resume "
        "with the same config or use another --workdir to start afresh")
  return [line(k) for k in allowed]
