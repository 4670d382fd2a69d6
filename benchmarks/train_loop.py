"""The training loop against its bare step, and time to first step with a
cold and a warm persistent compilation cache.

  python benchmarks/train_loop.py [--config configs/avmnist.py] [--steps 120]

Two real runs of `python -m mmjax.train --config CONFIG`, each in a fresh
work directory (`total_steps=--steps`, one final evaluation), sharing one
compilation cache directory that starts empty: the first starts cold, the
second warm. Their `time_to_first_step_s` (process start to the first step
done, as `metrics.jsonl` logs it; the dataset is built beforehand) is
reported, and the loop's examples/s (the mean of both runs' logged
intervals after the first, which exclude compilation) against the bare
step's (`harness.MmjaxStep` on one of the run's batches, timed in this
process after the runs): `loop_vs_step` is their ratio (1 = nothing lost in
the loop).
"""

import argparse
import contextlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

import harness
from mmjax import experiment

REPO = pathlib.Path(__file__).resolve().parents[1]


def train(config: str, workdir: pathlib.Path, cache: pathlib.Path,
          steps: int) -> list[dict]:
  env = {**os.environ, "MMJAX_CACHE_DIR": str(cache)}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  subprocess.run([sys.executable, "-m", "mmjax.train", "--config", config,
                  "--workdir", str(workdir), f"--config.total_steps={steps}",
                  f"--config.log_every={max(steps // 6, 1)}"],
                 cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/avmnist.py")
  parser.add_argument("--steps", type=int, default=120)
  args = parser.parse_args()
  config = harness.load_config(args.config)
  with contextlib.redirect_stdout(sys.stderr):  # tfds reports a first build
    run = experiment.build(config)
  batch = next(run.train_iterator())
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    runs = [train(args.config, tmp / f"run{i}", tmp / "cache", args.steps)
            for i in range(2)]
  cold, warm = [next(r["time_to_first_step_s"] for r in rows
                     if "time_to_first_step_s" in r) for rows in runs]
  intervals = [r["examples_per_sec"] for rows in runs for r in rows
               if "examples_per_sec" in r and "time_to_first_step_s" not in r]
  loop = float(np.mean(intervals))

  step = harness.MmjaxStep(config, {k: np.asarray(v) for k, v in batch.items()},
                           run=run)
  ms = harness.time_ms(step.run)
  row = harness.step_row(f"train_loop/{args.config}", "mmjax", ms,
                         config.batch_size, step.flops)
  harness.emit({**row, "loop_examples_per_sec": round(loop, 1),
                "step_examples_per_sec": row["examples_per_sec"],
                "loop_vs_step": round(loop / row["examples_per_sec"], 3),
                "first_step_cold_s": round(cold, 1),
                "first_step_warm_s": round(warm, 1)})


if __name__ == "__main__":
  main()
