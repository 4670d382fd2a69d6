"""`python -m mmjax.sweep`: grid parsing, point names, config checks before
anything starts, results tables, and real sweeps on AV-MNIST (one point
diverges; a rerun skips the finished point; Ctrl-C and resume)."""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from mmjax import results, sweep
from mmjax.errors import UsageError

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/avmnist.py:fusion=image_only,smoke"
TINY = ["--config.total_steps=10", "--config.batch_size=32",
        "--config.eval_every=10", "--config.log_every=5",
        "--config.checkpoint_every=10", "--config.eval_splits=('val',)",
        "--config.evaluators={'classification': {}}"]


@pytest.fixture(scope="session")
def data_dir(avmnist_data_dir):
  return avmnist_data_dir


def run_sweep(workdir, grid, *extra, config=CONFIG, env=None, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", **(env or {}))
  return subprocess.run(
      [sys.executable, "-m", "mmjax.sweep", "--config", config, "--workdir",
       str(workdir), "--grid", grid, *extra], cwd=REPO, capture_output=True,
      text=True, env=env, timeout=600, **kwargs)


# ------------------------------------------------------------------- grid ---


def test_grid_axes_values_and_points():
  axes = sweep.parse_grid(" fusion=late,concat  config.batch_size=64,128 ")
  assert [a.name for a in axes] == ["fusion", "config.batch_size"]
  assert [a.key for a in axes] == [None, "batch_size"]
  assert axes[1].values == ("64", "128")
  names = [p.name for p in sweep.grid_points(axes)]
  assert names == ["fusion=late,batch_size=64", "fusion=late,batch_size=128",
                   "fusion=concat,batch_size=64", "fusion=concat,batch_size=128"]


def test_grid_values_keep_brackets_and_quotes():
  axes = sweep.parse_grid("config.model.head_hidden=(100,),(64, 32) "
                          "config.eval_splits=('val',),('val','test')")
  assert axes[0].values == ("(100,)", "(64, 32)")
  assert axes[1].values == ("('val',)", "('val','test')")
  names = [p.name for p in sweep.grid_points(axes)]
  assert names[0] == "model.head_hidden=100,eval_splits=val"
  assert names[-1] == "model.head_hidden=64_32,eval_splits=val_test"
  assert all("/" not in n and " " not in n for n in names)


def test_point_names_are_filesystem_safe_and_bounded():
  assert sweep.point_name({"config.dataset": "tfds:mnist/3.0.1"}) == (
      "dataset=tfds_mnist_3.0.1")
  long = sweep.point_name({"config.x": "a" * 300})
  assert len(long) <= 200 and long.startswith("x=aaa")
  assert long != sweep.point_name({"config.x": "a" * 301})


def test_points_sharing_a_directory_are_refused():
  with pytest.raises(UsageError, match="would share the directory 'x=a_b'"):
    sweep.grid_points(sweep.parse_grid("config.x='a b','a/b'"))


@pytest.mark.parametrize("grid, message", [
    ("", "--grid needs at least one axis"),
    ("fusion", "'fusion' is not NAME=V1,V2"),
    ("fusion=", "axis 'fusion' has an empty value"),
    ("fusion=a,,b", "axis 'fusion' has an empty value"),
    ("fusion=a,a", "axis 'fusion' repeats a value"),
    ("seed=0 seed=1", "names axis 'seed' twice"),
    ("config=1", "names no config key"),
    ("1x=2", "'1x=2' is not NAME=V1,V2"),
    ("config.x=(1,2", "unclosed"),
    ("config.x=1)", "unbalanced ')'"),
    ("fusion=(a,b)", "ARGS value cannot hold a comma"),
])
def test_bad_grids(grid, message):
  with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(
      ")", r"\)")):
    sweep.parse_grid(grid)


def test_typed_values():
  assert [sweep.typed(v) for v in ("0", "-3", "1e-3", "0.5", "1e30", "late",
                                   "nan", "(1,)")] == [
      0, -3, 1e-3, 0.5, 1e30, "late", "nan", "(1,)"]


def test_arg_axes_join_the_config_args_and_key_axes_become_overrides():
  s = sweep.parse_command_line([
      "--config", "configs/avmnist.py:clean", "--workdir", "/tmp/w",
      "--grid", "fusion=late config.batch_size=64 seed=0",
      "--config.total_steps=5"])
  point = sweep.grid_points(s.axes)[0]
  assert point.name == "fusion=late,batch_size=64,seed=0"
  assert s.point_argv(point) == [
      "--config", "configs/avmnist.py:clean,fusion=late,seed=0",
      "--workdir", "/tmp/w/fusion=late,batch_size=64,seed=0",
      "--config.total_steps=5", "--config.batch_size=64"]
  s = sweep.parse_command_line(["--config=configs/avmnist.py", "--workdir=/w",
                                "--grid=config.seed=1", "--parallel=3"])
  assert s.parallel == 3
  assert s.point_argv(sweep.grid_points(s.axes)[0])[:2] == [
      "--config", "configs/avmnist.py"]


def test_configs_are_built_per_point():
  s = sweep.parse_command_line([
      "--config", "configs/avmnist.py:smoke", "--workdir", "/tmp/w",
      "--grid", "fusion=late,concat config.optimizer.learning_rate=1e-3,0.1"])
  points = sweep.plan(s)
  assert [(p.config.model.fusion, p.config.optimizer.learning_rate)
          for p in points] == [("late", 1e-3), ("late", 0.1),
                               ("concat", 1e-3), ("concat", 0.1)]
  assert all(p.config.total_steps == 40 for p in points)


# ---------------------------------------------------------- usage errors ---


BASE = ["--config", "configs/avmnist.py", "--workdir", "WORKDIR"]


@pytest.mark.parametrize("argv, message", [
    (BASE + ["--grid", "fusion=late,nope"],
     "error: grid axis 'fusion=nope': unknown model.fusion 'nope'"),
    (BASE + ["--grid", "fusion=late config.batch_sise=8,16"],
     "error: grid axis 'config.batch_sise=8': unknown config key 'batch_sise'"),
    (BASE + ["--grid", "fusion=late colour=red"],
     "error: grid axis 'colour=red': unknown config argument 'colour'"),
    (BASE + ["--grid", "seed=x"],
     "error: grid axis 'seed=x': config argument 'seed' takes int values, "
     "got 'x'"),
    (BASE + ["--grid", "config.total_steps=10,20 "
             "config.optimizer.warmup_steps=5,15"],
     "error: grid point 'total_steps=10,optimizer.warmup_steps=15': config key "
     "'optimizer.warmup_steps' (15) must be below total_steps (10)"),
    (BASE + ["--grid", "fusion=late", "--config.batch_sise=8"],
     "error: unknown config key 'batch_sise'"),
    (BASE + ["--grid", "config.seed=1", "--config.seed=2"],
     "error: config key 'seed' is both a grid axis and a --config.seed"),
    (BASE + ["--grid", "fusion=late fusion=concat"], "error: --grid names axis"),
    (BASE + ["--grid", "fusion=late", "--parallel", "0"],
     "error: --parallel must be a positive integer, got '0'"),
    (BASE + ["--grid", "fusion=late", "--colour"],
     "error: unknown argument '--colour'"),
    (BASE[:2] + ["--grid", "fusion=late"], "error: --workdir is missing"),
    (BASE, "error: --grid is missing"),
    (BASE + ["--grid"], "error: --grid needs a value"),
])
def test_usage_errors_are_one_line_exit_2_and_start_nothing(
    tmp_path, capsys, argv, message):
  workdir = tmp_path / "w"
  argv = [str(workdir) if a == "WORKDIR" else a for a in argv]
  assert sweep.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(message), err
  assert len(err.strip().splitlines()) == 1
  assert not workdir.exists()


def test_directory_of_another_config_is_refused(tmp_path, capsys):
  argv = ["--config", "configs/avmnist.py:smoke", "--workdir", str(tmp_path),
          "--grid", "fusion=late"]
  s = sweep.parse_command_line(argv)
  (point,) = sweep.plan(s)
  saved = json.loads(json.dumps(point.config.to_dict()))
  saved["data_dir"] = "/elsewhere"  # ignored: where data lives
  (tmp_path / point.name).mkdir()
  (tmp_path / point.name / "config.json").write_text(json.dumps(saved))
  sweep.plan(s)  # the same config
  saved["optimizer"]["learning_rate"] = 0.5
  (tmp_path / point.name / "config.json").write_text(json.dumps(saved))
  assert sweep.main(argv) == 2
  err = capsys.readouterr().err
  assert "holds a run with another config: optimizer.learning_rate: 0.5 -> " \
         "0.001" in err
  assert not (tmp_path / "results.json").exists()


# ---------------------------------------------------------------- results ---


def fake_run(run_dir, total_steps, finished=True, attempts=()):
  """A run directory as `mmjax.train` and the sweep leave it."""
  run_dir.mkdir(parents=True)
  rows = [{"step": 5, "train/loss": 2.0, "examples_per_sec": 10.0,
           "time_to_first_step_s": 9.0, "num_params": 7,
           "train_flops_per_example": 3.0},
          {"step": 10, "train/loss": 1.5, "examples_per_sec": 30.0},
          {"step": 10, "eval/d/classification/accuracy": 0.5}]
  if finished:
    rows += [{"step": 15, "train/loss": 1.0, "examples_per_sec": 50.0},
             {"step": 15, "eval/d/classification/accuracy": 0.75,
              "wall_time_s": 12.0}]
    (run_dir / "checkpoints" / str(total_steps)).mkdir(parents=True)
  (run_dir / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 1')  # torn
  for attempt in attempts:
    sweep.record_attempt(run_dir, attempt)


def attempt(outcome, seconds, error=""):
  return {"started": "2025-01-01T00:00:00", "wall_time_s": seconds,
          "exit_status": {"ok": 0, "failed": 1}.get(outcome, 130),
          "outcome": outcome, "error": error, "machine": "m"}


def test_results_rows_and_columns(tmp_path):
  s = sweep.parse_command_line([
      "--config", "configs/avmnist.py:smoke", "--workdir", str(tmp_path),
      "--grid", "config.total_steps=15 seed=0,1,2"])
  points = sweep.plan(s)
  fake_run(tmp_path / points[0].name, 15,
           attempts=[attempt("interrupted", 2.0), attempt("ok", 3.0)])
  fake_run(tmp_path / points[1].name, 15, finished=False,
           attempts=[attempt("failed", 4.0, "error: boom")])
  assert results.is_finished(tmp_path / points[0].name, 15)
  assert not results.is_finished(tmp_path / points[0].name, 20)
  rows = sweep.write_results(s, points)
  assert rows[0] == {
      "config.total_steps": 15, "seed": 0, "name": "total_steps=15,seed=0",
      "status": "ok", "error": "", "attempts": 2, "steps": 15,
      "total_steps": 15, "batch_size": points[0].config.batch_size, "train/loss": 1.0,
      "eval/d/classification/accuracy": 0.75, "num_params": 7,
      "train_flops_per_example": 3.0, "examples_per_sec": 40.0,
      "wall_time_s": 5.0, "machine": "m"}
  assert rows[1]["status"] == "failed" and rows[1]["error"] == "error: boom"
  assert rows[1]["steps"] == 10 and rows[1]["examples_per_sec"] == 30.0
  assert rows[2]["status"] == "pending" and rows[2]["steps"] is None
  assert rows[2]["wall_time_s"] is None
  assert results.load_results(tmp_path) == rows
  with (tmp_path / "results.csv").open() as f:
    table = list(csv.DictReader(f))
  assert list(table[0]) == [
      "config.total_steps", "seed", "name", "status", "error", "attempts",
      "steps", "total_steps", "batch_size", "train/loss",
      "eval/d/classification/accuracy",
      "num_params", "train_flops_per_example", "examples_per_sec",
      "wall_time_s", "machine"]
  assert table[2]["steps"] == "" and table[0]["examples_per_sec"] == "40.0"


def test_metric_picks_an_eval_value():
  row = {"name": "p", "eval/a_val/classification/accuracy": 0.5,
         "eval/a_test/classification/accuracy": 0.75,
         "eval/a_test/missing_modality/without_audio/accuracy": 0.25}
  assert results.metric(row, "missing_modality/without_audio/accuracy") == 0.25
  assert results.metric(row, "classification/accuracy", "a_test") == 0.75
  with pytest.raises(KeyError, match="ambiguous"):
    results.metric(row, "classification/accuracy")
  with pytest.raises(KeyError, match="absent"):
    results.metric(row, "classification/loss")


def test_error_line():
  text = "step 5\nerror: non-finite loss at step 2\ntail\n"
  assert sweep.error_line(text, 1) == "error: non-finite loss at step 2"
  assert sweep.error_line("Traceback\n  x\nValueError: bad\n\n", 1) == (
      "ValueError: bad")
  assert sweep.error_line("", 3) == "exit status 3"
  assert sweep.error_line("step 5\r\n", -9) == "killed by SIGKILL after: step 5"


# --------------------------------------------------------------- real runs ---


def test_sweep_with_a_diverging_point_then_rerun_skips_the_finished_one(
    tmp_path, data_dir):
  grid = "config.optimizer.learning_rate=1e-3,1e30"
  args = ["--parallel", "2", f"--config.data_dir={data_dir}", *TINY]
  result = run_sweep(tmp_path, grid, *args)
  assert result.returncode == 1, result.stdout + result.stderr
  good, bad = "optimizer.learning_rate=1e-3", "optimizer.learning_rate=1e30"
  rows = {r["name"]: r for r in results.load_results(tmp_path)}
  assert list(rows) == [good, bad]
  ok = rows[good]
  assert ok["status"] == "ok" and ok["error"] == ""
  assert ok["config.optimizer.learning_rate"] == 1e-3
  assert ok["steps"] == ok["total_steps"] == 10 and ok["attempts"] == 1
  assert 0 <= ok["eval/avmnist_val/classification/accuracy"] <= 1
  assert ok["train/loss"] > 0 and ok["num_params"] > 0
  assert ok["train_flops_per_example"] > 0 and ok["examples_per_sec"] > 0
  assert ok["wall_time_s"] > 0 and "CPU only" in ok["machine"]
  failed = rows[bad]
  assert failed["status"] == "failed"
  assert failed["error"].startswith("error: non-finite loss at step "), failed
  assert "eval/avmnist_val/classification/accuracy" not in failed
  with (tmp_path / "results.csv").open() as f:
    assert [r["status"] for r in csv.DictReader(f)] == ["ok", "failed"]
  assert (tmp_path / f"{good}.log").exists()
  assert (tmp_path / good / "checkpoints" / "10").is_dir()

  good_log = (tmp_path / f"{good}.log").read_text()
  result = run_sweep(tmp_path, grid, *args)
  assert result.returncode == 1, result.stdout + result.stderr
  assert f"{good}: finished, skipped" in result.stdout
  assert (tmp_path / f"{good}.log").read_text() == good_log  # not relaunched
  rows = {r["name"]: r for r in results.load_results(tmp_path)}
  assert rows[good] == ok
  assert rows[bad]["status"] == "failed" and rows[bad]["attempts"] == 2
  assert rows[bad]["wall_time_s"] > failed["wall_time_s"]
  assert (tmp_path / f"{bad}.log").read_text().count("sweep attempt") == 2


@pytest.mark.slow
def test_ctrl_c_keeps_checkpoints_and_rerun_resumes(tmp_path, data_dir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  command = [sys.executable, "-m", "mmjax.sweep", "--config", CONFIG,
             "--workdir", str(tmp_path), "--grid", "seed=0",
             f"--config.data_dir={data_dir}", "--config.total_steps=150",
             "--config.batch_size=32", "--config.checkpoint_every=10",
             "--config.log_every=10", "--config.eval_splits=('val',)"]
  process = subprocess.Popen(command, cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  checkpoints = tmp_path / "seed=0" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and not (
      checkpoints.exists() and any(p.name.isdigit() and int(p.name) >= 20
                                   for p in checkpoints.iterdir())):
    time.sleep(0.2)
  process.send_signal(signal.SIGINT)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 130, output
  assert "interrupted; stopping 1 run(s)" in output
  (row,) = results.load_results(tmp_path)
  assert row["status"] == "pending" and 20 <= row["steps"] < 150, row
  assert row["attempts"] == 1 and row["wall_time_s"] > 0
  log = (tmp_path / "seed=0.log").read_text()
  assert "interrupted at step" in log

  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  (row,) = results.load_results(tmp_path)
  assert row["status"] == "ok" and row["steps"] == 150
  assert row["attempts"] == 2
  assert "resumed from step" in (tmp_path / "seed=0.log").read_text()


def test_a_fusion_defined_outside_mmjax_trains_by_import_string(tmp_path,
                                                               data_dir):
  """`tests/custom_fusion.py` is no part of mmjax: named by import string in
  `--config.model.fusion`, it trains through the sweep's subprocesses."""
  result = run_sweep(
      tmp_path, "seed=0", f"--config.data_dir={data_dir}", *TINY,
      "--config.model.fusion=custom_fusion:GatedSum",
      config="configs/avmnist.py:smoke", env={"PYTHONPATH": str(REPO / "tests")})
  assert result.returncode == 0, result.stdout + result.stderr
  (row,) = results.load_results(tmp_path)
  assert row["status"] == "ok"
  assert 0 <= results.metric(row, "classification/accuracy") <= 1
  saved = json.loads((tmp_path / row["name"] / "config.json").read_text())
  assert saved["model"]["fusion"] == "custom_fusion:GatedSum"
