"""Evaluates the latest checkpoint of a run: `python -m mmjax.evaluate`.

  python -m mmjax.evaluate --config configs/avmnist.py[:ARGS] --workdir DIR \
      [--config.KEY=VALUE ...]

Prints one JSON object, {"step": N, "eval/<dataset>/<evaluator>/<metric>":
value, ...}, for every split in `config.eval_splits` (names as in training).
"""

import json
import sys
from collections.abc import Sequence

from mmjax import checkpoint, cli, experiment, rundir
from mmjax.errors import UsageError


def restore_latest(config, workdir: str):
  """(run, state): the run of `config` built for evaluation
  (`experiment.build(training=False)`) and the latest checkpoint in
  `workdir` restored into it; UsageError if the run's config differs in a
  key that matters or there is no checkpoint."""
  rundir.check_resume(workdir, config.to_dict())  # the run's own model
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  try:
    if ckpt.latest_step() is None:
      raise UsageError(f"no checkpoint in {ckpt.directory}")
    run = experiment.build(config, training=False)
    state, _ = ckpt.restore(run.state)
  finally:
    ckpt.close()
  return run, state


def evaluate(config, workdir: str) -> dict:
  """Restores the latest checkpoint in `workdir` and evaluates every split."""
  run, state = restore_latest(config, workdir)
  return {"step": int(state.step), **run.evaluate(state)}


def main(argv: Sequence[str] | None = None) -> int:
  def run(args):
    print(json.dumps(evaluate(*cli.parse_command_line(args, cli.EVALUATE))))

  return cli.main(run, cli.EVALUATE, argv)


if __name__ == "__main__":
  sys.exit(main())
