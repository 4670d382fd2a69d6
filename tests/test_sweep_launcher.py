"""`python -m mmjax.sweep --launcher local|slurm` (submitit): flag checks
before anything is submitted, the Slurm batch script and resubmission
(with a fake sbatch and sacct on PATH, no cluster), a job requeued at its
time limit resuming, and a real sweep through submitit's LocalExecutor
(results, skip-finished, resume)."""

import json
import os
import shutil
import sys

import pytest

from mmjax import results, sweep
from test_sweep import CONFIG, TINY, run_sweep

submitit = pytest.importorskip("submitit")

BASE = ["--config", "configs/avmnist.py:smoke", "--workdir", "WORKDIR",
        "--grid", "seed=0,1"]


@pytest.fixture(scope="session")
def data_dir(avmnist_data_dir):
  return avmnist_data_dir


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
  """srun, sbatch and sacct on PATH: sbatch keeps each batch script as
  FAKE/sbatch.N.sh and answers `Submitted batch job 123+N`; sacct prints
  FAKE/sacct.txt (lines JobID|State|NodeList)."""
  fake = tmp_path / "fake_slurm"
  (fake / "bin").mkdir(parents=True)
  scripts = {
      "srun": "exit 0\n",
      "sbatch": 'n=$(ls "$FAKE_SLURM"/sbatch.*.sh 2>/dev/null | wc -l)\n'
                'cp "$1" "$FAKE_SLURM/sbatch.$n.sh"\n'
                'echo "Submitted batch job $((123 + n))"\n',
      "sacct": 'echo "JobID|State|NodeList"\n'
               'cat "$FAKE_SLURM/sacct.txt" 2>/dev/null\n'}
  for name, text in scripts.items():
    (fake / "bin" / name).write_text("#!/bin/sh\n" + text)
    (fake / "bin" / name).chmod(0o755)
  monkeypatch.setenv("FAKE_SLURM", str(fake))
  monkeypatch.setenv("PATH", f"{fake / 'bin'}{os.pathsep}{os.environ['PATH']}")
  return fake


def sacct(fake, text):
  (fake / "sacct.txt").write_text(text)
  from submitit.slurm.slurm import SlurmJob  # pylint: disable=import-outside-toplevel
  SlurmJob.watcher.clear()  # as a new process would ask sacct afresh


def batch_scripts(fake):
  return sorted(fake.glob("sbatch.*.sh"))


# ------------------------------------------------------------------ flags ---


def test_parse_time():
  assert [sweep.parse_time(t) for t in (
      "90", "1:30", "01:30:00", "2-0", "1-2:03", "1-00:00:05")] == [
      5400, 90, 5400, 172800, 93780, 86405]


@pytest.mark.parametrize("argv, message", [
    (["--launcher", "kubernetes"],
     "error: --launcher must be one of subprocess, local, slurm, got "
     "'kubernetes'"),
    (["--launcher", "local", "--time", "1:2:3:4"],
     "error: --time must be minutes or [D-]HH:MM:SS, got '1:2:3:4'"),
    (["--launcher", "slurm", "--time", "0"], "error: --time must be positive"),
    (["--launcher", "slurm", "--time", "an hour"],
     "error: --time must be minutes or"),
    (["--time", "10"], "error: --time needs --launcher local or slurm"),
    (["--launcher", "local", "--partition", "gpu"],
     "error: --partition needs --launcher slurm"),
    (["--no_wait"], "error: --no_wait needs --launcher slurm"),
    (["--launcher", "slurm", "--no_wait=1"],
     "error: --no_wait takes no value"),
    (["--launcher", "slurm", "--parallel", "2"],
     "error: --parallel is for the subprocess and local launchers"),
    (["--launcher", "slurm", "--gpus_per_task", "0"],
     "error: --gpus_per_task must be a positive integer, got '0'"),
    (["--launcher", "slurm", "--gpus_per_task", "1", "--gpus_per_node", "8"],
     "error: give --gpus_per_task or --gpus_per_node, not both"),
    (["--launcher", "slurm", "--slurm_extra", "=x"],
     "error: --slurm_extra must be KEY=VALUE or KEY"),
])
def test_launcher_flag_errors_are_one_line_exit_2_and_submit_nothing(
    tmp_path, capsys, fake_slurm, argv, message):
  workdir = tmp_path / "w"
  argv = [str(workdir) if a == "WORKDIR" else a for a in BASE] + argv
  assert sweep.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(message), err
  assert len(err.strip().splitlines()) == 1
  assert not workdir.exists() and not batch_scripts(fake_slurm)


def test_slurm_needs_srun_and_submitit(tmp_path, capsys, monkeypatch):
  workdir = tmp_path / "w"
  argv = [str(workdir) if a == "WORKDIR" else a for a in BASE] + [
      "--launcher", "slurm"]
  monkeypatch.setenv("PATH", str(tmp_path))  # no srun
  assert sweep.main(argv) == 2
  assert capsys.readouterr().err.startswith(
      "error: --launcher slurm: no srun on PATH")
  monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
  assert sweep.main(argv) == 2
  err = capsys.readouterr().err
  assert err == ('error: --launcher local and slurm need submitit: pip '
                 'install -e ".[cluster]"\n')
  assert not workdir.exists()
  # The default launcher never imports submitit.
  s = sweep.parse_command_line([a for a in argv if a not in (
      "--launcher", "slurm")])
  assert s.launcher == "subprocess" and s.wait


# ------------------------------------------------------------------ slurm ---


def test_slurm_batch_script_no_wait_and_resubmission(tmp_path, capsys,
                                                    fake_slurm):
  workdir = tmp_path / "w"
  argv = [str(workdir) if a == "WORKDIR" else a for a in BASE] + [
      "--launcher", "slurm", "--partition", "gpu", "--gpus_per_task", "1",
      "--time", "1:30:00", "--cpus_per_task", "8",
      "--slurm_array_parallelism", "1", "--slurm_extra", "account=abc",
      "--slurm_extra", "exclusive", "--slurm_setup", "module load cuda",
      "--no_wait", "--config.total_steps=7"]
  assert sweep.main(argv) == 0
  out = capsys.readouterr().out
  assert "1/2 seed=0: submitted as slurm 123_0" in out
  assert "2/2 seed=1: submitted as slurm 123_1" in out
  (script,) = batch_scripts(fake_slurm)
  text = script.read_text()
  for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1",
               "#SBATCH --time=90", "#SBATCH --cpus-per-task=8",
               "#SBATCH --array=0-1%1", "#SBATCH --requeue",
               "#SBATCH --account=abc", "#SBATCH --exclusive",
               "#SBATCH --signal=USR2@90", "module load cuda",
               f"#SBATCH --output={workdir}/submitit/%A_%a/%A_%a_0_log.out"):
    assert line in text.splitlines(), text
  assert f"-m submitit.core._submit {workdir}/submitit/%j" in text
  # Each array task runs the point's `python -m mmjax.train` command.
  for i, seed in enumerate((0, 1)):
    delayed = submitit.core.utils.DelayedSubmission.load(
        workdir / "submitit" / f"123_{i}" / f"123_{i}_submitted.pkl")
    job = delayed.function
    assert isinstance(job, sweep.TrainJob) and job.launcher == "slurm"
    assert job.args == [
        "-m", "mmjax.train", "--config", f"configs/avmnist.py:smoke,seed={seed}",
        "--workdir", str(workdir / f"seed={seed}"), "--config.total_steps=7"]
    assert job.log == str(workdir / f"seed={seed}.log") and job.env is None
  assert [r["status"] for r in results.load_results(workdir)] == [
      "pending", "pending"]

  # Queued or running: the same command again submits nothing.
  sacct(fake_slurm, "123_0|RUNNING|node1\n123_1|PENDING|\n")
  assert sweep.main(argv) == 0
  assert "seed=0: already submitted as slurm 123_0" in capsys.readouterr().out
  assert len(batch_scripts(fake_slurm)) == 1

  # Ended without training (failed, cancelled): recorded, submitted again.
  sacct(fake_slurm, "123_0|FAILED|node1\n123_1|CANCELLED by 7|\n")
  assert sweep.main(argv) == 0
  out = capsys.readouterr().out
  assert "seed=0: submitted as slurm 124_0" in out
  assert len(batch_scripts(fake_slurm)) == 2
  (failed,) = sweep.attempts_of(workdir / "seed=0")
  assert failed["outcome"] == "failed" and failed["job"] == "slurm 123_0"
  assert failed["error"].startswith(
      "slurm 123_0 ended (FAILED) before the training")
  (cancelled,) = sweep.attempts_of(workdir / "seed=1")
  assert cancelled["outcome"] == "interrupted"
  rows = results.load_results(workdir)
  assert [(r["status"], r["attempts"]) for r in rows] == [
      ("pending", 1), ("pending", 1)]


# ----------------------------------------------------------- job requeue ---


FAKE_TRAINING = """
import os, signal, sys, time
marker = sys.argv[1]
if os.path.exists(marker):
  print("resumed from step 5"); sys.exit(0)
def preempted(*_):
  open(marker, "w").close(); print("saved step 5", flush=True); sys.exit(143)
signal.signal(signal.SIGTERM, preempted)
print("training", flush=True)
time.sleep(120)
"""


def test_a_job_at_its_time_limit_checkpoints_requeues_and_resumes(tmp_path):
  """submitit's time-limit signal: the job stops its training (SIGTERM; it
  saves and exits 143), records the attempt and is requeued, and the same
  command then resumes."""
  run_dir, log = tmp_path / "p", tmp_path / "p.log"
  job = sweep.TrainJob(["-c", FAKE_TRAINING, str(tmp_path / "saved")],
                       str(run_dir), str(log), str(tmp_path))
  executor = submitit.LocalExecutor(tmp_path / "submitit" / "%j")
  # The time-limit signal 12 s after the start (timeout 30 s, delay 18 s).
  executor.update_parameters(timeout_min=0.5, signal_delay_s=18,
                             stderr_to_stdout=True)
  result = executor.submit(job).result()
  attempts = sweep.attempts_of(run_dir)
  assert [(a["outcome"], a["exit_status"]) for a in attempts] == [
      ("interrupted", 143), ("ok", 0)], log.read_text()
  assert result == attempts[-1]
  text = log.read_text()
  assert text.count("sweep attempt") == 2 and "sweep attempt 2 (local job" in (
      text)
  assert "saved step 5" in text and "resumed from step 5" in text
  assert not (run_dir / sweep.RUNNING_FILE).exists()


# ------------------------------------------------------------- real runs ---


def test_local_launcher_sweep_skips_finished_points_and_resumes(tmp_path,
                                                               data_dir):
  grid = "seed=0,1"
  args = ["--launcher", "local", "--parallel", "2",
          f"--config.data_dir={data_dir}", *TINY, "--config.checkpoint_every=5"]
  result = run_sweep(tmp_path, grid, *args, config=CONFIG)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "1/2 seed=0: submitted as local " in result.stdout
  rows = results.load_results(tmp_path)
  assert [(r["name"], r["status"], r["attempts"], r["steps"]) for r in rows] == [
      ("seed=0", "ok", 1, 10), ("seed=1", "ok", 1, 10)]
  assert all(0 <= results.metric(r, "classification/accuracy") <= 1
             and "CPU only" in r["machine"] and r["wall_time_s"] > 0
             for r in rows)
  with (tmp_path / "results.csv").open() as f:
    assert [line.split(",")[2] for line in f][1:] == ["ok", "ok"]
  jobs = sorted((tmp_path / "submitit").iterdir())
  assert len(jobs) == 2 and all(j.name.isdigit() for j in jobs), jobs
  logs = {n: (tmp_path / f"{n}.log").read_text() for n in ("seed=0", "seed=1")}
  assert all("sweep attempt 1 (local job" in t for t in logs.values())
  attempt = sweep.attempts_of(tmp_path / "seed=0")[0]
  assert attempt["job"].startswith("local ") and attempt["exit_status"] == 0

  # The same command again: a finished point is skipped (no job, its log
  # untouched); one interrupted after its step-5 checkpoint (its later
  # checkpoint gone, its attempt interrupted) resumes.
  shutil.rmtree(tmp_path / "seed=1" / "checkpoints" / "10")
  sweep.record_attempt(tmp_path / "seed=1", {
      "started": "2025-01-01T00:00:00", "wall_time_s": 1.0,
      "exit_status": 143, "outcome": "interrupted", "error": "",
      "machine": "m"})
  s = sweep.parse_command_line(["--config", CONFIG, "--workdir",
                                str(tmp_path), "--grid", grid, *args])
  assert [r["status"] for r in sweep.write_results(s, sweep.plan(s))] == [
      "ok", "pending"]
  result = run_sweep(tmp_path, grid, *args, config=CONFIG)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "seed=0: finished, skipped" in result.stdout
  assert "seed=1: submitted as local " in result.stdout
  assert (tmp_path / "seed=0.log").read_text() == logs["seed=0"]
  assert len(set((tmp_path / "submitit").iterdir()) - set(jobs)) == 1
  rows = results.load_results(tmp_path)
  assert [(r["status"], r["attempts"], r["steps"]) for r in rows] == [
      ("ok", 1, 10), ("ok", 3, 10)]
  log = (tmp_path / "seed=1.log").read_text()
  assert "sweep attempt 3 (local job" in log and "resumed from step 5" in log
  assert (tmp_path / "seed=1" / "checkpoints" / "10").is_dir()
