"""Trains a model from a config: `python -m mmjax.train`.

  python -m mmjax.train --config configs/avmnist.py[:ARGS] --workdir DIR \
      [--config.KEY=VALUE ...] \
      [--coordinator HOST:PORT --num_processes N --process_id I]

Multi-host: every process runs the same command (`mmjax.distributed` starts
jax.distributed from the flags or from the cluster JAX detects); each reads
its rows of every global batch, all take part in each checkpoint, and
process 0 writes the logs.

Running the same command again resumes from the latest checkpoint in
DIR/checkpoints: parameters, optimizer state, RNG, step and the data
iterator's position, so an interrupted run ends bit-identical to an
uninterrupted one. Writes DIR/config.json, DIR/metrics.jsonl and TensorBoard
events under DIR/tensorboard. Bad input prints one `error: ...` line and exits
with status 2; a non-finite loss stops the run (status 1) and keeps the last
good checkpoint. Each step is checkpointed before it is evaluated, so a run
stopped during its final evaluation only evaluates when run again.

Preemption: SIGTERM (Slurm before its time limit or on preemption,
Kubernetes eviction, cloud maintenance) lets the current step finish, saves
a checkpoint of it and exits with status 143 (128 + SIGTERM, as a shell
reports a process that SIGTERM ended), so that a scheduler requeues the job
(`#SBATCH --requeue`; a batch script can requeue on 143 with `scontrol
requeue $SLURM_JOB_ID`) and the same command resumes bit-identically. The
processes of a multi-host run agree after every step whether any of them
received SIGTERM, so that they save the same step and all exit with 143.
SIGINT stops at once and keeps the latest periodic checkpoint (status 130).

The run's parts come from `mmjax.experiment`; training methods change the
step and the loop only through their hooks (`mmjax.methods`).
"""

import signal
import sys
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from mmjax import (accumulate, checkpoint, cli, experiment, hardware,
                   methods, metric_writers, objectives, parallel, rundir,
                   selection)
from mmjax.experiment import TrainState


class Diverged(Exception):
  """The loss became NaN or infinite."""


class Preempted(Exception):
  """SIGTERM arrived; the step it interrupted was finished and saved."""


PREEMPTED = cli.PREEMPTED  # exit status after SIGTERM (128 + 15)


class SigtermFlag:
  """Records SIGTERM instead of dying of it, while the `with` block runs
  (in the main thread; elsewhere Python handles no signals).

  `any_process()` is whether any process of the run received it: the
  processes of a multi-host run agree, after every step, whether to save
  and stop, so that none starts a step the others do not.
  """

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, *_):
    self.received = True

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.received
    return bool(multihost_utils.process_allgather(
        np.array(self.received)).any())

  def __exit__(self, *_):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def make_train_step(model, tx, objective, method=None, *,
                    grad_accum_steps: int = 1, mesh=None):
  """The one train step: (state, batch) -> (state, metrics).

  `method` (`mmjax.methods.Method`; default: plain training) weighs the
  objective's heads and may transform the gradients. `grad_accum_steps` > 1
  computes the gradients over that many microbatches of the batch
  (`mmjax.accumulate`; `mesh`: the trainer's, whose data axis the batch is
  sharded over); the step is still one optimizer step per batch.
  """
  method = method or methods.Method()
  grad_fn = accumulate.gradient_fn(
      grad_accum_steps, whole_batch=objectives.whole_batch(objective),
      loss_weight=objectives.loss_weight(objective),
      split=objectives.cache_split(objective), mesh=mesh)

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    weights = method.loss_weights(state.method_state)

    def forward(params, batch, rng):
      return model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch,
          train=True, mutable=["batch_stats", "intermediates"],
          rngs={"dropout": rng})

    grads, (metrics, updates, outputs) = grad_fn(
        forward, lambda outputs, batch: objective(outputs, batch, weights),
        state.params, batch, rng)
    grads, method_metrics = method.transform_grads(
        grads, outputs=outputs, intermediates=updates.get("intermediates", {}),
        batch=batch, state=state, rng=rng)
    metrics.update(method_metrics)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    finite = jnp.isfinite(metrics["loss"])
    nonfinite_step = jnp.where((state.nonfinite_step < 0) & ~finite,
                               state.step + 1, state.nonfinite_step)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.replace(step=state.step + 1, params=params,
                         batch_stats=updates.get("batch_stats", {}),
                         opt_state=opt_state,
                         nonfinite_step=nonfinite_step), metrics

  return train_step


def compile_train_step(config, model, tx, method, mesh, shardings, state,
                       batch, *, donate: bool = True,
                       compiler_options: dict | None = None):
  """(compiled step, FLOPs per step): `make_train_step` for `config`
  (objective, `grad_accum_steps`) jitted with the state's `shardings` and
  the batch split over `mesh`, compiled for (state, batch), and XLA's count
  of one step's FLOPs over all devices. `donate`: the step reuses the input
  state's buffers (the trainer; a benchmark that reruns one state does not).
  `compiler_options`: XLA's, by default `hardware.compiler_options()`.
  """
  if compiler_options is None:
    compiler_options = hardware.compiler_options()
  objective = objectives.objective_of(config, mesh)
  accum = config.get("grad_accum_steps", 1)
  step_fn = jax.jit(
      make_train_step(model, tx, objective, method, grad_accum_steps=accum,
                      mesh=mesh),
      in_shardings=(shardings, parallel.batch_sharding(mesh)),
      out_shardings=(shardings, None), donate_argnums=(0,) if donate else (),
      compiler_options=compiler_options)
  compiled = step_fn.lower(state, batch).compile()
  flops = metric_writers.compiled_flops(compiled, mesh.size)
  if accum > 1:  # XLA counts a loop's body once: count the step without
    # accumulation, lowered and not compiled (so its FLOPs are global)
    flops = metric_writers.compiled_flops(jax.jit(make_train_step(
        model, tx, objective, method)).lower(state, batch), 1)
  return compiled, flops


def check_finite(state: TrainState, workdir: str):
  bad = int(jax.device_get(state.nonfinite_step))
  if bad >= 0:
    raise Diverged(f"non-finite loss at step {bad}; training stopped; the "
                   f"last good checkpoint is kept in {workdir}")


def train(config, workdir: str, start_time: float | None = None
          ) -> tuple[TrainState, dict]:
  """Trains (or resumes) the run in `workdir`.

  Returns (the final state, the final evaluation's metrics).
  """
  start_time = start_time or time.time()
  with rundir.RunLock(workdir, jax.process_index()), SigtermFlag() as sigterm:
    return _train(config, workdir, start_time, sigterm)


def _train(config, workdir: str, start_time: float, sigterm: SigtermFlag):
  # ---------------------------------------------------------------- build --
  changed = rundir.check_resume(workdir, config.to_dict())  # before writing
  run = experiment.build(config)
  state, method = run.state, run.method
  data = run.train_iterator()
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  if ckpt.latest_step() is not None:  # before anything is written
    state, data_state = ckpt.restore(state)
    data.set_state(data_state)
  writer = metric_writers.MetricWriter(workdir, config.total_steps,
                                       config.to_dict())
  for line in changed:
    writer.info(f"resuming with a changed config key: {line}")
  if ckpt.latest_step() is not None:
    writer.resume(int(state.step))
    writer.info(f"resumed from step {int(state.step)} in {ckpt.directory}")
  step = first_step = int(state.step)

  best = selection.build(config, workdir)  # config.select_best

  def evaluate(state, step: int) -> dict:
    """Evaluates `state` (offered to the checkpoint selection) and writes the
    row; the final row is the selected state's (the last one's if none)."""
    row = run.evaluate(state)
    best.observe(step, state, row)
    if step < config.total_steps:
      writer.write(step, row)
      return row
    if best.best_step not in (None, step):
      writer.write(step, row)  # the last state's, for the curves
      row = run.evaluate(best.selected(state))
    if best.best_step is not None:
      row["selected_step"] = best.best_step
    row["wall_time_s"] = time.time() - start_time  # this process's run
    writer.write(step, row)
    return row

  try:
    # ------------------------------------------------------ finished? ----
    if step >= config.total_steps:
      if writer.has_final_row(config.total_steps):
        writer.info(f"already trained for {config.total_steps} steps")
        return state, {}
      writer.info(f"evaluating the final checkpoint, step {step}")
      return state, evaluate(state, step)  # stopped in its final evaluation
    if step and step % config.eval_every == 0 and not writer.has_eval_row(step):
      evaluate(state, step)  # stopped between its checkpoint and evaluation

    # ---------------------------------------------------------- compile --
    batch = next(data)
    compiled, flops_per_step = compile_train_step(
        config, run.model, run.tx, method, run.mesh, run.shardings, state,
        batch)
    peak = hardware.peak_flops(config.peak_flops)
    if step == 0:  # the method's look before the first step
      state, row = method.after_step(0, state, run.predict, compiled)
      if row:
        writer.write(0, row)

    # ------------------------------------------------------------- loop --
    accumulated, time_to_first_step = None, None
    interval_start, interval_steps = time.time(), 0
    final = {}
    while step < config.total_steps:
      cli.raise_if_interrupted()  # a SIGINT whose KeyboardInterrupt was lost
      if batch is None:
        batch = next(data)
      state, metrics = compiled(state, batch)
      batch = None
      step += 1
      interval_steps += 1
      accumulated = metrics if accumulated is None else jax.tree.map(
          jnp.add, accumulated, metrics)
      state, row = method.after_step(step, state, run.predict, compiled)
      if row:
        writer.write(step, row)
      if step == first_step + 1:
        jax.block_until_ready(state)
        time_to_first_step = time.time() - start_time
        writer.info(f"first step done {time_to_first_step:.1f}s after start "
                    f"({flops_per_step / config.batch_size / 1e6:.1f} MFLOP "
                    "per example per train step)")
        interval_start, interval_steps, accumulated = time.time(), 0, None
      done = step == config.total_steps
      if (step % config.log_every == 0 or done) and interval_steps:
        check_finite(state, workdir)
        elapsed = time.time() - interval_start
        row = {f"train/{k}": float(v) / interval_steps
               for k, v in jax.device_get(accumulated).items()}
        row["learning_rate"] = float(run.schedule(step))
        row["steps_per_sec"] = interval_steps / elapsed
        row["examples_per_sec"] = interval_steps * config.batch_size / elapsed
        row["mfu"] = flops_per_step * interval_steps / elapsed / peak
        if time_to_first_step is not None:
          row["time_to_first_step_s"], time_to_first_step = (
              time_to_first_step, None)
          row["num_params"] = sum(x.size for x in jax.tree.leaves(state.params))
          row["train_flops_per_example"] = flops_per_step / config.batch_size
        writer.write(step, row)
        interval_start, interval_steps, accumulated = time.time(), 0, None
      # Checkpoint first: a run stopped during its evaluation keeps the step.
      stop = sigterm.any_process()
      if step % config.checkpoint_every == 0 or done or stop:
        check_finite(state, workdir)
        ckpt.save(step, state, data.get_state())
      if stop and not done:
        ckpt.wait()
        raise Preempted(f"SIGTERM: stopped after step {step}, saved in "
                        f"{ckpt.directory}; the same command resumes")
      if step % config.eval_every == 0 or done:
        check_finite(state, workdir)
        final = evaluate(state, step)
        interval_start = time.time()
    return state, final
  except KeyboardInterrupt:
    writer.info(f"interrupted at step {step}; the latest checkpoint is step "
                f"{ckpt.latest_step()}")
    raise
  finally:
    try:
      ckpt.wait()
    finally:
      ckpt.close()
      best.close()
      writer.close()


def main(argv: Sequence[str] | None = None) -> int:
  start_time = time.time()

  def run(args):
    config, workdir = cli.parse_command_line(args, cli.TRAIN)
    train(config, workdir, start_time)

  return cli.main(run, cli.TRAIN, argv,
                  errors={Diverged: 1, Preempted: PREEMPTED})


if __name__ == "__main__":
  sys.exit(main())
