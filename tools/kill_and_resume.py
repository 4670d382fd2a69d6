"""Kills real runs at random moments, resumes them, and checks bit-identity.

  python tools/kill_and_resume.py [--trials 10] [--sweep-trials 10] \
      [--workdir /tmp/kill_and_resume] [--seed 0] [--config CONFIG] \
      [--config.KEY=VALUE ...]

Train: one uninterrupted reference run of a small `configs/avmnist.py`
image_only recipe (30 steps of 32, a checkpoint every 5, the final
evaluation), timed once the compilation cache holds its programs; then
per trial a fresh run SIGKILLed after a delay drawn uniformly from [0, the
reference's wall time], so that the kill lands
anywhere: start-up, a step, a checkpoint save or the final evaluation. The
same command is rerun until it exits 0, and the final checkpoint (params,
batch statistics, optimizer state, RNG, step) must equal the reference's bit
for bit, with exactly one final metrics row.

Sweep: a 2-point `mmjax.sweep` (seeds 0 and 1 of the same recipe), first
once uninterrupted and timed (its points must equal the reference runs),
then per trial stopped with SIGINT (Ctrl-C) after a delay drawn uniformly
from [0, that sweep's wall time], and rerun; every point's final checkpoint
must equal its uninterrupted reference.

`--config` replaces the recipe's config file and arguments, and
`--config.KEY=VALUE` overrides are added to every run, so that the levers
can be checked too, for example
`--config "configs/avmnist.py:fusion=image_only,image=vit"
--config.dtype=bfloat16 --config.remat=nothing_saveable
--config.grad_accum_steps=2`.

Prints one JSON line per trial and a summary line; exit status 1 if any
trial differs. Uses the `avmnist` dataset under $TFDS_DATA_DIR (built on
first use).
"""

import argparse
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/avmnist.py:fusion=image_only"
RECIPE = ["--config.total_steps=30", "--config.batch_size=32",
          "--config.checkpoint_every=5", "--config.log_every=5",
          "--config.eval_every=30", "--config.optimizer.warmup_steps=2",
          "--config.eval_splits=('val[:500]',)", "--config.mesh_devices=1"]
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def train_command(workdir, seed=0):
  return [sys.executable, "-m", "mmjax.train", "--config",
          f"{CONFIG},seed={seed}", "--workdir", str(workdir), *RECIPE]


def sweep_command(workdir):
  return [sys.executable, "-m", "mmjax.sweep", "--config", CONFIG,
          "--workdir", str(workdir), "--grid", "seed=0,1", *RECIPE]


def set_recipe(config: str, overrides: list[str]):
  """The config and the extra `--config.KEY=VALUE` overrides of every run."""
  global CONFIG  # pylint: disable=global-statement
  CONFIG = config
  RECIPE.extend(overrides)


def final_state(workdir, step=30) -> dict:
  path = pathlib.Path(workdir).absolute() / "checkpoints" / str(step) / "state"
  return ocp.tree.to_flat_dict(ocp.StandardCheckpointer().restore(path))


def same(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(
      np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def final_rows(workdir) -> int:
  rows = [json.loads(line) for line in
          (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return sum("wall_time_s" in r for r in rows)


def run_to_completion(command, limit=10) -> int:
  """Reruns `command` until it exits 0; returns the number of reruns."""
  for attempt in range(1, limit + 1):
    if subprocess.run(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode == 0:
      return attempt
  raise RuntimeError(f"{command} did not finish in {limit} attempts")


def killed(command, delay: float, signum: int) -> str:
  """Starts `command`, sends `signum` after `delay` s; what happened."""
  process = subprocess.Popen(command, cwd=REPO, env=ENV,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL,
                             start_new_session=True)
  try:
    process.wait(delay)
    return "finished before the signal"
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signum)
    process.wait()
    return f"{signal.Signals(signum).name} at {delay:.1f}s"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trials", type=int, default=10)
  parser.add_argument("--sweep-trials", type=int, default=10)
  parser.add_argument("--workdir", default="/tmp/kill_and_resume")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--skip-train", action="store_true",
                      help="only the sweep trials")
  parser.add_argument("--config", default=CONFIG)
  args, overrides = parser.parse_known_args()
  if any(not o.startswith("--config.") or "=" not in o for o in overrides):
    parser.error(f"unknown arguments {overrides}; overrides are "
                 "--config.KEY=VALUE")
  set_recipe(args.config, overrides)
  rng = random.Random(args.seed)
  root = pathlib.Path(args.workdir)
  if root.exists():
    sys.exit(f"error: --workdir {root} exists; choose a new one")
  failures = 0

  references, wall = {}, None
  for seed in (0, 1):  # seed 1's wall time: compiled programs cached by then
    start = time.time()
    run_to_completion(train_command(root / f"reference_{seed}", seed))
    wall = time.time() - start
    references[seed] = final_state(root / f"reference_{seed}")
  print(json.dumps({"reference_wall_time_s": round(wall, 1)}), flush=True)

  for trial in range(0 if args.skip_train else args.trials):
    workdir = root / f"train_{trial}"
    what = killed(train_command(workdir), rng.uniform(0, wall), signal.SIGKILL)
    reruns = run_to_completion(train_command(workdir))
    ok = same(final_state(workdir), references[0]) and final_rows(workdir) == 1
    failures += not ok
    print(json.dumps({"trial": trial, "kind": "train", "event": what,
                      "reruns": reruns, "identical": ok}), flush=True)
    shutil.rmtree(workdir)

  start = time.time()
  run_to_completion(sweep_command(root / "sweep_reference"))
  sweep_wall = time.time() - start
  ok = all(same(final_state(root / "sweep_reference" / f"seed={s}"),
                references[s]) for s in (0, 1))
  failures += not ok
  print(json.dumps({"sweep_wall_time_s": round(sweep_wall, 1),
                    "identical_to_the_runs": ok}), flush=True)
  for trial in range(args.sweep_trials):
    workdir = root / f"sweep_{trial}"
    what = killed(sweep_command(workdir), rng.uniform(0, sweep_wall),
                  signal.SIGINT)
    reruns = run_to_completion(sweep_command(workdir))
    ok = all(same(final_state(workdir / f"seed={s}"), references[s]) and
             final_rows(workdir / f"seed={s}") == 1 for s in (0, 1))
    failures += not ok
    print(json.dumps({"trial": trial, "kind": "sweep", "event": what,
                      "reruns": reruns, "identical": ok}), flush=True)
    shutil.rmtree(workdir)

  total = (0 if args.skip_train else args.trials) + args.sweep_trials
  print(json.dumps({"trials": total, "identical": total - failures,
                    "differ": failures}), flush=True)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
