"""Data-parallel scaling: examples/s per device for 1, 2, 4 and 8 devices in
one process, and for 8 devices as 1 process or as 2 processes of 4.

  python benchmarks/scaling.py [--config configs/avmnist.py:fusion=image_only]
      [--per_device_batch 32] [--iters 10] [--plot FILE.png]

Weak scaling: every device gets `--per_device_batch` examples, so the
global batch grows with the devices. Each measurement is a fresh process
(simulated CPU devices, `--xla_force_host_platform_device_count`, unless an
accelerator is present) that times mmjax's train step (`harness.MmjaxStep`)
on a fixed random batch; the 2-process row runs two processes on localhost
through `jax.distributed` (`mmjax.distributed`: gloo collectives on CPU),
each holding its half of every global batch. On a CPU the simulated devices
share the same cores, so the figures check correctness and the overhead of
sharding and of a second process, not accelerator scaling. One JSON row per
measurement; `--plot` draws examples/s per device against devices.
"""

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
SETTINGS = [(1, 1), (2, 1), (4, 1), (8, 1), (8, 2)]  # (devices, processes)


def worker(args):
  """One measurement; process 0 prints its JSON row."""
  from mmjax import distributed  # pylint: disable=import-outside-toplevel
  if args.num_processes > 1:
    distributed.initialize(args.coordinator, args.num_processes,
                           args.process_id)
  import jax  # pylint: disable=import-outside-toplevel
  import harness  # pylint: disable=import-outside-toplevel
  devices = jax.device_count()
  batch_size = args.per_device_batch * devices
  config = harness.load_config(args.config, batch_size=batch_size)
  rng = np.random.default_rng(0)
  shapes = {"image": ((28, 28, 1), np.uint8, 256),
            "audio": ((112, 112, 1), np.uint8, 256)}
  batch = {m: rng.integers(0, high, (batch_size, *shape), dtype=dtype)
           for m, (shape, dtype, high) in shapes.items()
           if m in config.modalities}
  batch.update({f"mask/{m}": np.ones(batch_size, bool)
                for m in config.modalities})
  batch["label"] = rng.integers(0, 10, batch_size).astype(np.int32)
  step = harness.MmjaxStep(config, batch)
  ms = harness.time_ms(step.run, iters=args.iters)
  if jax.process_index() == 0:
    row = harness.step_row("scaling", "mmjax", ms, batch_size, step.flops,
                           devices=devices, processes=jax.process_count(),
                           config=args.config)
    row["examples_per_sec_per_device"] = round(
        row["examples_per_sec"] / devices, 1)
    harness.emit(row)


def measure(args, devices: int, processes: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                      f"device_count={devices // processes}")
  command = [sys.executable, str(HERE / "scaling.py"), "--worker",
             "--config", args.config, "--iters", str(args.iters),
             "--per_device_batch", str(args.per_device_batch)]
  if processes > 1:
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
    command += ["--coordinator", f"localhost:{port}",
                "--num_processes", str(processes)]
  running = [subprocess.Popen(command + ["--process_id", str(i)], env=env,
                              stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
             for i in range(processes)]
  outputs = [p.communicate()[0] for p in running]
  if any(p.returncode for p in running):
    raise SystemExit(f"error: the {devices}-device, {processes}-process "
                     "measurement failed")
  rows = [json.loads(line) for line in outputs[0].splitlines()
          if line.startswith("{")]  # gloo prints its connections too
  return rows[-1]


def plot(rows, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  one = [r for r in rows if r["processes"] == 1]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([r["devices"] for r in one],
          [r["examples_per_sec_per_device"] for r in one], "o-",
          label="1 process")
  for r in rows:
    if r["processes"] > 1:
      ax.plot(r["devices"], r["examples_per_sec_per_device"], "s",
              label=f"{r['processes']} processes")
  ax.set_xscale("log", base=2)
  ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
  ax.set_xlabel("devices (simulated on this machine's CPU)")
  ax.set_ylabel("examples/s per device")
  ax.set_title(f"{rows[0]['config']}, {rows[0]['batch_size'] // rows[0]['devices']}"
               " examples per device", fontsize=8)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/avmnist.py:fusion=image_only")
  p.add_argument("--per_device_batch", type=int, default=32)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--plot")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--coordinator", help=argparse.SUPPRESS)
  p.add_argument("--num_processes", type=int, default=1,
                 help=argparse.SUPPRESS)
  p.add_argument("--process_id", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(args)
  rows = []
  for devices, processes in SETTINGS:
    rows.append(measure(args, devices, processes))
    print(json.dumps(rows[-1]), flush=True)
  if args.plot:
    plot(rows, args.plot)
  return None


if __name__ == "__main__":
  main()
