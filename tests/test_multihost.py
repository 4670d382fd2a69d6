"""Multi-host training on one machine: 2 processes on localhost, 4 simulated
CPU devices each, collectives through gloo (`mmjax.distributed`), against
one process with 8 devices on the same global batches."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmjax import cli, distributed, train
from mmjax.errors import UsageError

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/avmnist.py:fusion=image_only"
RECIPE = ["--config.total_steps=40", "--config.batch_size=32",
          "--config.checkpoint_every=8", "--config.log_every=1",
          "--config.eval_every=40", "--config.eval_splits=('val[:70]',)",
          "--config.eval_batch_size=32", "--config.optimizer.warmup_steps=2"]


# 8 more steps (OGM-GE's keys, which follow total_steps, kept as they were).
EXTENDED = ["--config.total_steps=48", "--config.imbalance.ogm_ge.end_step=20"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def env(devices: int) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def launch(module, args, processes: int) -> list[subprocess.Popen]:
  """`python -m module args` as one process of 8 devices or as
  `processes` processes of 4 devices on localhost."""
  if processes == 1:
    return [subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO,
                             env=env(8), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)]
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, "-m", module, *args, "--coordinator",
       f"localhost:{port}", "--num_processes", str(processes),
       "--process_id", str(i)], cwd=REPO, env=env(4),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(processes)]


def finish(processes, timeout=300) -> list[tuple[int, str, str]]:
  out = []
  for p in processes:
    try:
      stdout, stderr = p.communicate(timeout=timeout)
    finally:
      p.kill()
    out.append((p.returncode, stdout, stderr))
  return out


def run_ok(module, args, processes):
  results = finish(launch(module, args, processes))
  for status, stdout, stderr in results:
    assert status == 0, stderr[-3000:]
  return results


def train_args(workdir, data_dir):
  return ["--config", CONFIG, "--workdir", str(workdir),
          f"--config.data_dir={data_dir}", *RECIPE]


def rows(workdir) -> list[dict]:
  return [json.loads(line) for line in
          (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def losses(workdir) -> dict[int, float]:
  return {r["step"]: r["train/loss"] for r in rows(workdir)
          if "train/loss" in r}


def final_state(workdir, step=40) -> dict:
  """The checkpoint of `step`, on this process's first device (whatever
  devices and processes wrote it)."""
  path = pathlib.Path(workdir).absolute() / "checkpoints" / str(step) / "state"
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      ocp.StandardCheckpointHandler().metadata(path).tree)
  return ocp.tree.to_flat_dict(ocp.StandardCheckpointer().restore(path,
                                                                  target))


def wait_for(condition, processes, timeout=240):
  deadline = time.time() + timeout
  while not condition():
    assert all(p.poll() is None for p in processes), "a process ended early"
    assert time.time() < deadline, "timed out"
    time.sleep(0.05)


def checkpoint_steps(workdir) -> list[int]:
  directory = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()
                ) if directory.is_dir() else []


@pytest.fixture(scope="module")
def runs(avmnist_data_dir, tmp_path_factory):
  """{"one": 1 process x 8 devices, uninterrupted;
      "sigterm": 2 processes x 4, SIGTERM to process 1 only, then resumed;
      "sigkill": 2 processes x 4, both SIGKILLed after a checkpoint, then
                 resumed} -> (workdir, what happened)."""
  root = tmp_path_factory.mktemp("multihost")
  out = {}
  run_ok("mmjax.train", train_args(root / "one", avmnist_data_dir), 1)
  out["one"] = (root / "one", None)

  workdir = root / "sigterm"
  processes = launch("mmjax.train", train_args(workdir, avmnist_data_dir), 2)
  wait_for(lambda: (workdir / "metrics.jsonl").is_file()
           and '"step": 2,' in (workdir / "metrics.jsonl").read_text(),
           processes)
  processes[1].send_signal(signal.SIGTERM)
  stopped = finish(processes)
  resumed = run_ok("mmjax.train", train_args(workdir, avmnist_data_dir), 2)
  out["sigterm"] = (workdir, (stopped, resumed))

  workdir = root / "sigkill"
  processes = launch("mmjax.train", train_args(workdir, avmnist_data_dir), 2)
  wait_for(lambda: checkpoint_steps(workdir), processes)
  for p in processes:
    p.send_signal(signal.SIGKILL)
  finish(processes)
  killed_at = max(checkpoint_steps(workdir))
  resumed = run_ok("mmjax.train", train_args(workdir, avmnist_data_dir), 2)
  out["sigkill"] = (workdir, (killed_at, resumed))

  # Both continue for 8 more steps in one process: the 2-process checkpoint
  # and data position resume with another process count.
  for name in ("one", "sigkill"):
    run_ok("mmjax.train", train_args(root / name, avmnist_data_dir)
           + EXTENDED, 1)
  return out


@pytest.mark.slow
def test_two_processes_train_as_one_with_eight_devices(runs):
  one, two = runs["one"][0], runs["sigterm"][0]
  a, b = ({s: v for s, v in losses(w).items() if s <= 40} for w in (one, two))
  # each (re)start logs from its second step
  assert set(b) <= set(a) == set(range(2, 41)) and len(b) >= len(a) - 2
  np.testing.assert_allclose([b[s] for s in sorted(b)],
                             [a[s] for s in sorted(b)], rtol=0, atol=1e-6)
  x, y = final_state(one), final_state(two)
  assert x.keys() == y.keys()
  for path in x:
    np.testing.assert_allclose(y[path], x[path], rtol=0, atol=1e-6,
                               err_msg=str(path))
  evals = [[r for r in rows(w) if r["step"] == 40
            and any(k.startswith("eval/") for k in r)] for w in (one, two)]
  assert len(evals[0]) == len(evals[1]) == 1  # 70 examples: 3 batches of 32
  for key, value in evals[0][0].items():
    if key.startswith("eval/"):
      assert evals[1][0][key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
def test_a_two_process_run_resumes_in_one_process(runs):
  x, y = final_state(runs["one"][0], 48), final_state(runs["sigkill"][0], 48)
  for path in x:
    np.testing.assert_allclose(y[path], x[path], rtol=0, atol=1e-6,
                               err_msg=str(path))
  assert losses(runs["sigkill"][0]).keys() >= set(range(42, 49))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_saved_step(runs):
  workdir, (stopped, resumed) = runs["sigterm"]
  assert [status for status, _, _ in stopped] == [train.PREEMPTED] * 2
  steps = {int(err.split("stopped after step ")[1].split(",")[0])
           for _, _, err in stopped}
  assert len(steps) == 1, steps  # both processes agree
  (step,) = steps
  assert 2 <= step < 40
  assert f"resumed from step {step}" in resumed[0][1] + resumed[0][2]


@pytest.mark.slow
def test_sigkill_of_both_processes_resumes_bit_identically(runs):
  workdir, (killed_at, resumed) = runs["sigkill"]
  assert 8 <= killed_at < 40
  assert f"resumed from step {killed_at}" in resumed[0][1] + resumed[0][2]
  x, y = final_state(runs["sigterm"][0]), final_state(workdir)
  assert x.keys() == y.keys()
  for path in x:
    np.testing.assert_array_equal(y[path], x[path], err_msg=str(path))


@pytest.mark.slow
def test_two_process_evaluation_counts_every_example_once(runs,
                                                         avmnist_data_dir):
  args = train_args(runs["one"][0], avmnist_data_dir) + EXTENDED
  ((_, single, _),) = run_ok("mmjax.evaluate", args, 1)
  double = run_ok("mmjax.evaluate", args, 2)
  expected = json.loads(single)
  printed = [out.strip().splitlines() for _, out, _ in double]
  # gloo (CPU collectives) prints its connections on stdout first
  assert all(line.startswith("[Gloo]") for line in printed[0][:-1] + printed[1])
  assert json.loads(printed[0][-1]) == pytest.approx(expected, abs=1e-6)


WORKER = """
import sys, json
import numpy as np, jax, ml_collections
from jax.experimental import multihost_utils
from mmjax import distributed, parallel
from mmjax.data import pipeline
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
config = ml_collections.ConfigDict(dict(
    batch_size=8, seed=5, modalities=("image",), audio_length=0,
    data_workers=0))
source = [{"image": np.full((1, 1, 1), i, np.int32), "label": 0}
          for i in range(40)]
it = pipeline.TrainIterator(source, config,
                            parallel.batch_sharding(parallel.make_mesh()),
                            jax.process_index(), jax.process_count())
local, seen = [], []
for _ in range(10):  # two epochs of 5 global batches
  batch = next(it)["image"]
  local.append(np.concatenate([np.asarray(s.data) for s in
                               batch.addressable_shards]).ravel().tolist())
  seen.append(np.asarray(multihost_utils.process_allgather(
      batch, tiled=True)).ravel().tolist())
print(json.dumps({"local": local, "global": seen}))
"""


def test_processes_read_disjoint_shares_covering_each_epoch(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  port = free_port()
  processes = [subprocess.Popen(
      [sys.executable, str(script), f"localhost:{port}", str(i)], cwd=REPO,
      env=env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
  results = finish(processes, timeout=120)
  for status, _, stderr in results:
    assert status == 0, stderr[-3000:]
  out = [json.loads(stdout.strip().splitlines()[-1])  # after gloo's lines
         for _, stdout, _ in results]
  assert out[0]["global"] == out[1]["global"]
  for epoch in range(2):
    batches = range(5 * epoch, 5 * epoch + 5)
    shares = [sum((o["local"][b] for b in batches), []) for o in out]
    assert len(shares[0]) == len(shares[1]) == 20
    assert sorted(shares[0] + shares[1]) == list(range(40))  # no gap, no twin
    assert [out[0]["local"][b] + out[1]["local"][b] for b in batches] == [
        out[0]["global"][b] for b in batches]


@pytest.mark.parametrize("flags, message", [
    (dict(coordinator="localhost:1"), "--num_processes, --process_id "
     "missing"),
    (dict(coordinator="localhost:1", num_processes="2", process_id="2"),
     "--process_id 2 is not in [0, --num_processes 2)"),
    (dict(coordinator="nohost", num_processes="2", process_id="0"),
     "--coordinator takes HOST:PORT"),
    (dict(coordinator="h:1", num_processes="two", process_id="0"),
     "--num_processes takes an integer"),
])
def test_bad_multihost_flags(flags, message):
  with pytest.raises(UsageError, match=message.replace("[", r"\[")
                     .replace("(", r"\(").replace(")", r"\)")):
    distributed.initialize(**flags)


def test_without_flags_or_cluster_a_run_stays_single_process(monkeypatch):
  for name in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri",
               "KUBERNETES_SERVICE_HOST"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False
  assert "--coordinator" in cli.TRAIN.help() and "--process_id" in (
      cli.EVALUATE.help())
