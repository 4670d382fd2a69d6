"""mmjax.rundir: the work directory lock (with real processes) and the
resume config check."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mmjax import rundir
from mmjax.errors import UsageError

HOLDER = textwrap.dedent("""
    import sys, time
    from mmjax import rundir
    with rundir.RunLock(sys.argv[1]):
      print("locked", flush=True)
      time.sleep(120)
""")


def start_holder(workdir):
  """A second process holding the lock; returns once it holds it."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(rundir.__file__)))] +
      os.environ.get("PYTHONPATH", "").split(os.pathsep)))
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)],
                          stdout=subprocess.PIPE, env=env, text=True)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_a_second_run_is_refused_until_the_holder_is_killed(tmp_path):
  workdir = tmp_path / "run"
  proc = start_holder(workdir)
  try:
    with pytest.raises(UsageError) as e:
      with rundir.RunLock(workdir):
        pass
    assert str(e.value) == (f"{workdir} is in use by another run (pid "
                            f"{proc.pid}); wait for it or choose another "
                            "--workdir")
    # Refused again: the failed attempt neither broke the lock nor the pid.
    with pytest.raises(UsageError, match=f"pid {proc.pid}"):
      rundir.RunLock(workdir).acquire()
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
  # The kernel dropped the killed holder's lock: no stale lock.
  with rundir.RunLock(workdir) as lock:
    assert (workdir / ".lock").read_text().strip() == str(os.getpid())
    assert lock.path == workdir / ".lock"


def test_the_lock_is_released_on_exit_and_reusable(tmp_path):
  lock = rundir.RunLock(tmp_path)
  with lock:
    with pytest.raises(UsageError, match="in use by another run"):
      rundir.RunLock(tmp_path).acquire()  # another open file: refused too
  with rundir.RunLock(tmp_path):
    pass
  lock.release()  # idempotent


def test_the_lock_creates_the_work_directory(tmp_path):
  with rundir.RunLock(tmp_path / "a" / "b"):
    assert (tmp_path / "a" / "b" / ".lock").exists()


def test_an_unreadable_pid_still_refuses(tmp_path):
  proc = start_holder(tmp_path)
  try:
    # A lock file whose pid is lost (not the holder's business to keep it).
    with open(tmp_path / ".lock", "r+") as f:
      f.truncate(0)
    with pytest.raises(UsageError, match=r"\(pid unknown\)"):
      rundir.RunLock(tmp_path).acquire()
  finally:
    proc.kill()
    proc.wait()
    proc.stdout.close()


def test_import_is_light():
  start = time.time()
  out = subprocess.run(
      [sys.executable, "-c", "import sys, mmjax.rundir; "
       "print('jax' in sys.modules, 'flax' in sys.modules)"],
      capture_output=True, text=True, check=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(rundir.__file__))))
  assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
  assert time.time() - start < 10


# ------------------------------------------------------------ configs ---

OLD = {
    "dataset": "avmnist", "modalities": ["image", "audio"], "seed": 0,
    "batch_size": 64, "total_steps": 1000, "eval_every": 100,
    "log_every": 10, "checkpoint_every": 100, "keep_checkpoints": 3,
    "eval_batch_size": 256, "eval_splits": ["val"], "data_dir": "/a",
    "source_dir": "data", "data_workers": 4, "peak_flops": None,
    "objective": {"name": "classification"},
    "model": {"fusion": "late", "width": 64, "encoders": {"image": "lenet"}},
    "optimizer": {"name": "adamw", "learning_rate": 1e-3},
    "evaluators": {"classification": {}},
}


def changed(**updates):
  new = json.loads(json.dumps(OLD))
  for dotted, value in updates.items():
    node, keys = new, dotted.split("__")
    for k in keys[:-1]:
      node = node[k]
    node[keys[-1]] = value
  return new


def test_flatten():
  assert rundir.flatten({"a": {"b": 1, "c": {"d": [1]}}, "e": {}}) == {
      "a.b": 1, "a.c.d": [1]}


def test_identical_configs_differ_nowhere():
  assert rundir.compare_configs(OLD, json.loads(json.dumps(OLD))) == ([], [])
  assert rundir.compare_configs({"x": 1}, {"x": 1.0}) == ([], [])


def test_harmless_keys_are_allowed():
  new = changed(eval_every=50, log_every=1, checkpoint_every=10,
                keep_checkpoints=1, eval_batch_size=8, eval_splits=["test"],
                data_dir="/b", source_dir="/src", data_workers=0,
                peak_flops=1e15, total_steps=2000,
                evaluators={"classification": {"k": 5}, "retrieval": {"n": 1}})
  refused, allowed = rundir.compare_configs(OLD, new)
  assert refused == []
  assert allowed == sorted([
      "eval_every", "log_every", "checkpoint_every", "keep_checkpoints",
      "eval_batch_size", "eval_splits", "data_dir", "source_dir",
      "data_workers", "peak_flops", "total_steps", "evaluators.classification.k", "evaluators.retrieval.n"])


@pytest.mark.parametrize("total_steps", [1000, 999, 500])
def test_total_steps_may_only_grow(total_steps):
  refused, allowed = rundir.compare_configs(OLD, changed(total_steps=total_steps))
  assert allowed == []
  assert refused == ([] if total_steps == 1000 else ["total_steps"])


@pytest.mark.parametrize("key,value", [
    ("dataset", "coco"), ("modalities", ["image"]), ("seed", 1),
    ("batch_size", 32), ("objective__name", "contrastive"),
    ("model__width", 128), ("model__encoders__image", "vit"),
    ("optimizer__learning_rate", 3e-4), ("optimizer__name", "sgd")])
def test_keys_that_change_the_run_are_refused(key, value):
  refused, allowed = rundir.compare_configs(OLD, changed(**{key: value}))
  assert refused == [key.replace("__", ".")] and allowed == []


def test_removed_keys_are_refused_added_keys_allowed():
  """A key the saved config lacks was added to mmjax after the run began."""
  new = changed(model__dropout=0.1)
  del new["model"]["width"]
  new["eval_extra"] = 1
  del new["log_every"]
  refused, allowed = rundir.compare_configs(OLD, new)
  assert refused == ["model.width"]
  assert allowed == ["eval_extra", "log_every", "model.dropout"]


def write_config(workdir, config):
  workdir.mkdir(exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def test_check_resume_without_a_config_is_a_fresh_run(tmp_path):
  assert rundir.check_resume(tmp_path, OLD) == []
  assert rundir.check_resume(tmp_path / "missing", OLD) == []


def test_check_resume_returns_the_allowed_differences(tmp_path):
  write_config(tmp_path, OLD)
  new = changed(total_steps=5000, eval_every=500)
  new["modalities"] = ("image", "audio")  # a tuple as written to JSON
  assert rundir.check_resume(tmp_path, new) == [
      "eval_every: 100 -> 500", "total_steps: 1000 -> 5000"]
  assert rundir.check_resume(tmp_path, OLD) == []


def test_check_resume_refuses_naming_five_keys(tmp_path):
  write_config(tmp_path, OLD)
  new = changed(seed=1, batch_size=8, model__width=32, dataset="coco",
                optimizer__learning_rate=0.1, objective__name="x",
                total_steps=10, eval_every=1)
  with pytest.raises(UsageError) as e:
    rundir.check_resume(tmp_path, new)
  message = str(e.value)
  assert message.startswith(f"{tmp_path} holds a run with another config: "
                            "batch_size: 64 -> 8; dataset: \"avmnist\" -> "
                            "\"coco\"; model.width: 64 -> 32; objective.name: ")
  assert "(and 2 more)" in message and "seed" not in message
  assert "eval_every" not in message
  assert message.endswith("use another --workdir to start afresh")
  assert "\n" not in message


def test_check_resume_shows_absent_keys(tmp_path):
  write_config(tmp_path, OLD)
  new = changed()
  del new["model"]["width"]
  with pytest.raises(UsageError, match=r"model.width: \S+ -> \(absent\);"):
    rundir.check_resume(tmp_path, new)
  new = changed()
  new["model"]["norm"] = "layer"
  assert rundir.check_resume(tmp_path, new) == [
      'model.norm: (absent) -> "layer"']


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_check_resume_with_a_broken_config_json(tmp_path, text):
  (tmp_path / "config.json").write_text(text)
  with pytest.raises(UsageError, match="config.json .*use another --workdir"):
    rundir.check_resume(tmp_path, OLD)
