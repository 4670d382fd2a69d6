"""Evaluates a run's result: `python -m mmjax.evaluate`.

  python -m mmjax.evaluate --config configs/avmnist.py[:ARGS] --workdir DIR \
      [--config.KEY=VALUE ...]

Prints one JSON object, {"step": N, "eval/<dataset>/<evaluator>/<metric>":
value, ...}, for every split in `config.eval_splits` (names as in training).
The result is the state `config.select_best` selected (`<workdir>/best`,
`mmjax.selection`; N is its step, the final row's `selected_step`), and
without a selection the latest checkpoint.
A multi-host evaluation (`--coordinator ...`, or a cluster JAX detects, as
for `mmjax.train`) runs the same command on every process; process 0
prints.
"""

import json
import sys
from collections.abc import Sequence

import jax

from mmjax import checkpoint, cli, experiment, rundir, selection
from mmjax.errors import UsageError


def restore_result(config, workdir: str):
  """(run, state): the run of `config` built for evaluation
  (`experiment.build(training=False)`) and its result restored into it: the
  selected state (`selection.restore_selected`), else the latest checkpoint
  in `workdir`; UsageError if the run's config differs in a key that
  matters or there is no checkpoint."""
  rundir.check_resume(workdir, config.to_dict())  # the run's own model
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  try:
    if ckpt.latest_step() is None:
      raise UsageError(f"no checkpoint in {ckpt.directory}")
    run = experiment.build(config, training=False)
    state, _ = ckpt.restore(run.state)
  finally:
    ckpt.close()
  return run, selection.restore_selected(config, workdir, state)


def evaluate(config, workdir: str) -> dict:
  """Restores the run's result in `workdir` and evaluates every split."""
  run, state = restore_result(config, workdir)
  return {"step": int(state.step), **run.evaluate(state)}


def main(argv: Sequence[str] | None = None) -> int:
  def run(args):
    result = evaluate(*cli.parse_command_line(args, cli.EVALUATE))
    if jax.process_index() == 0:  # one line however many processes
      print(json.dumps(result))

  return cli.main(run, cli.EVALUATE, argv)


if __name__ == "__main__":
  sys.exit(main())
