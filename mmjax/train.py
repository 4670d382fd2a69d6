"""Trains a model from a config: `python -m mmjax.train`.

  python -m mmjax.train --config configs/avmnist.py[:ARGS] --workdir DIR \
      [--config.KEY=VALUE ...]

Running the same command again resumes from the latest checkpoint in
DIR/checkpoints: parameters, optimizer state, RNG, step and the data
iterator's position, so an interrupted run ends bit-identical to an
uninterrupted one. Writes DIR/config.json, DIR/metrics.jsonl and TensorBoard
events under DIR/tensorboard. Bad input prints one `error: ...` line and exits
with status 2; a non-finite loss stops the run (status 1) and keeps the last
good checkpoint. Each step is checkpointed before it is evaluated, so a run
stopped during its final evaluation only evaluates when run again.
"""

import re
import signal
import sys
import time
from collections.abc import Sequence

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds
from absl import logging as absl_logging

from mmjax import (checkpoint, configs, evaluators, imbalance, metric_writers,
                   objectives, parallel)
from mmjax.data import builders, pipeline
from mmjax.errors import UsageError
from mmjax.evaluators.zero_shot import class_embeddings_from_prompts
from mmjax.models import pretrained
from mmjax.models.contrastive import ContrastiveModel
from mmjax.models.encoders import ENCODERS, FRONTENDS
from mmjax.models.fusion import FUSIONS
from mmjax.models.multimodal import MISSING, MultimodalClassifier

USAGE = ("usage: python -m mmjax.{prog} --config configs/X.py[:ARGS] "
         "--workdir DIR [--config.KEY=VALUE ...]")


class Diverged(Exception):
  """The loss became NaN or infinite."""


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; saved whole in every checkpoint."""
  step: jnp.ndarray  # int32 scalar: steps completed
  params: dict
  batch_stats: dict
  opt_state: optax.OptState
  rng: jnp.ndarray  # uint32[2], the run's base key; step keys fold in `step`
  nonfinite_step: jnp.ndarray  # int32: first step with a non-finite loss, or -1
  # mmjax.imbalance's state, e.g. G-Blending's loss weights; {} for most runs.
  imbalance: dict = flax.struct.field(default_factory=dict)


# ----------------------------------------------------------------- config ---


def parse_command_line(argv: Sequence[str], prog: str = "train"):
  """argv (without the program) -> (locked config, workdir)."""
  spec = workdir = None
  overrides = []
  args = list(argv)
  while args:
    arg = args.pop(0)
    name, eq, value = arg.partition("=")
    if name in ("--config", "--workdir") and not eq:
      if not args:
        raise UsageError(f"{name} needs a value; {USAGE.format(prog=prog)}")
      value = args.pop(0)
    if name == "--config":
      spec = value
    elif name == "--workdir":
      workdir = value
    elif name.startswith("--config."):
      overrides.append(arg[len("--config."):])
    else:
      raise UsageError(f"unknown argument '{arg}'; {USAGE.format(prog=prog)}")
  if not spec or not workdir:
    raise UsageError(USAGE.format(prog=prog))
  config = configs.apply_overrides(configs.load_config(spec), overrides)
  check_config(config)
  return config, workdir


def check_config(config):
  """Fails at config time on any unknown name, listing the known ones."""
  if not config.dataset.startswith("tfds:"):  # else tfds's own registry
    configs.check_choice("dataset", config.dataset.split("/")[0],
                         builders.BUILDERS)
  configs.check_choice("objective", config.objective, objectives.OBJECTIVES)
  configs.check_choice("optimizer.name", config.optimizer.name, OPTIMIZERS)
  configs.check_choice("optimizer.schedule", config.optimizer.schedule,
                       SCHEDULES)
  configs.check_choice("sharding", config.sharding, parallel.STRATEGIES)
  for modality in config.modalities:
    if modality not in config.model.encoders:
      raise UsageError(f"config key 'model.encoders' has no encoder for "
                       f"modality '{modality}'")
  for modality, spec in config.model.encoders.items():
    configs.check_choice(f"model.encoders.{modality}.name", spec["name"],
                         ENCODERS)
    if spec.get("frontend"):
      configs.check_choice(f"model.encoders.{modality}.frontend.name",
                           spec["frontend"]["name"], FRONTENDS)
  for evaluator in config.evaluators:
    configs.check_choice("evaluators", evaluator, evaluators.EVALUATORS)
  if config.objective == "supervised":
    configs.check_choice("model.fusion", config.model.fusion, FUSIONS)
    configs.check_choice("model.missing", config.model.missing, MISSING)
    for modality, rate in config.model.modality_dropout.items():
      if not 0 <= rate < 1:
        raise UsageError(f"config key 'model.modality_dropout.{modality}' "
                         f"must be in [0, 1), got {rate}")
  imbalance.check_config(config)
  for key in ("batch_size", "total_steps", "log_every", "eval_every",
              "checkpoint_every", "eval_batch_size"):
    if config[key] <= 0:
      raise UsageError(f"config key '{key}' must be positive, "
                       f"got {config[key]}")
  if not 0 <= config.optimizer.warmup_steps < config.total_steps:
    raise UsageError(f"config key 'optimizer.warmup_steps' "
                     f"({config.optimizer.warmup_steps}) must be below "
                     f"total_steps ({config.total_steps})")


# ------------------------------------------------------ model & optimizer ---


def build_model(config):
  """The classifier (objective "supervised") or the contrastive towers."""
  if config.objective != "supervised":
    # A tower whose whole encoder matches `frozen` also skips its backward.
    frozen = re.compile(config.frozen) if config.frozen else None
    return ContrastiveModel(
        modalities=tuple(config.modalities),
        encoders=configs.to_dict(config.model.encoders),
        embed_dim=config.model.embed_dim,
        objective=config.objective.split("_")[0],
        locked=tuple(m for m in config.modalities
                     if frozen and frozen.fullmatch(f"tower_{m}/encoder/")))
  return MultimodalClassifier(
      modalities=tuple(config.modalities),
      encoders=configs.to_dict(config.model.encoders),
      fusion=config.model.fusion,
      num_classes=config.model.num_classes,
      head_hidden=tuple(config.model.head_hidden),
      fusion_kwargs=configs.to_dict(config.model.fusion_kwargs),
      modality_dropout=configs.to_dict(config.model.modality_dropout),
      missing=config.model.missing,
      unimodal_heads=imbalance.unimodal_heads(config))


SCHEDULES = {
    "cosine": lambda lr, warmup, total: optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, total, end_value=0.0),
    "constant": lambda lr, warmup, total: optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
        [warmup]),
}

OPTIMIZERS = {
    "adamw": lambda schedule, c: optax.adamw(schedule,
                                             weight_decay=c.weight_decay),
    "sgd": lambda schedule, c: optax.chain(
        optax.add_decayed_weights(c.weight_decay),
        optax.sgd(schedule, momentum=c.momentum or None)),
}


def build_optimizer(config):
  """(optax transformation, learning-rate schedule) from `config.optimizer`."""
  c = config.optimizer
  schedule = SCHEDULES[c.schedule](c.learning_rate, c.warmup_steps,
                                   config.total_steps)
  tx = OPTIMIZERS[c.name](schedule, c)
  if c.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx)
  if config.get("frozen"):
    # LiT (Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text
    # Tuning", CVPR 2022): parameters whose path matches are never updated.
    pattern = re.compile(config.frozen)
    labels = lambda params: flax.traverse_util.path_aware_map(
        lambda path, _: "frozen" if pattern.fullmatch("/".join(path))
        else "trained", params)
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()},
                               labels)
  return tx, schedule


def example_batch_spec(source, config, batch_size: int) -> dict:
  """ShapeDtypeStructs of one training batch, read off the first example."""
  ds = pipeline.train_transforms(
      grain.MapDataset.source(source)[:1].seed(config.seed), config)
  return {k: jax.ShapeDtypeStruct((batch_size,) + np.shape(v),
                                  np.asarray(v).dtype)
          for k, v in ds[0].items()}


def load_pretrained(state: TrainState, inits) -> TrainState:
  """Overwrites parameter subtrees with pretrained weights, keeping shardings.

  `inits` maps a parameter path ("tower_text/encoder") to a pretrained
  checkpoint name: "minilm" is sentence-transformers all-MiniLM-L6-v2
  (`mmjax.models.pretrained`).
  """
  loaders = {"minilm": lambda: pretrained.load_minilm()[1]}
  params = jax.tree.map(lambda x: x, state.params)  # fresh containers
  for path, name in inits.items():
    configs.check_choice(f"model.init.{path}", name, loaders)
    *parents, leaf = path.split("/")
    node = params
    for key in parents:
      node = node[key]
    old, new = node[leaf], loaders[name]()
    if jax.tree.structure(old) != jax.tree.structure(new) or any(
        o.shape != np.shape(n) for o, n in zip(jax.tree.leaves(old),
                                               jax.tree.leaves(new))):
      raise UsageError(f"config key 'model.init': '{name}' does not fit the "
                       f"parameters at '{path}'")
    node[leaf] = jax.tree.map(
        lambda o, n: jax.device_put(np.asarray(n, o.dtype), o.sharding),
        old, new)
  return state.replace(params=params)


def create_train_state(config, model, tx, batch_spec, mesh):
  """Shape-first initialisation: (state, state shardings).

  The state's shapes come from `jax.eval_shape`, its shardings from them, and
  the jitted initialiser writes each array straight into its sharding.
  """
  def init(rng):
    batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch_spec.items()}
    variables = model.init({"params": rng, "dropout": rng}, batch, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=rng,
                      nonfinite_step=jnp.full((), -1, jnp.int32),
                      imbalance=imbalance.Balance.from_config(
                          config).init_state())

  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  shardings = parallel.state_shardings(abstract, mesh, config.sharding)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings


# ------------------------------------------------------------------ steps ---


def make_train_step(model, tx, objective, balance=None):
  """The one train step: (state, batch) -> (state, metrics).

  `balance` (`imbalance.Balance`; default: plain training) weighs the
  unimodal heads' losses and may modulate the gradients (OGM-GE).
  """
  balance = balance or imbalance.Balance()

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      outputs, updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch,
          train=True, mutable=["batch_stats"], rngs={"dropout": rng})
      loss, metrics = objective(outputs, batch,
                                balance.loss_weights(state.imbalance))
      return loss, (metrics, updates.get("batch_stats", {}), outputs)

    grads, (metrics, batch_stats, outputs) = jax.grad(loss_fn, has_aux=True)(
        state.params)
    grads, balance_metrics = balance.modulate_grads(grads, outputs, batch,
                                                    state, rng)
    metrics.update(balance_metrics)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(metrics["loss"])
    nonfinite_step = jnp.where((state.nonfinite_step < 0) & ~finite,
                               state.step + 1, state.nonfinite_step)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.replace(step=state.step + 1, params=params,
                         batch_stats=batch_stats, opt_state=opt_state,
                         nonfinite_step=nonfinite_step), metrics

  return train_step


def make_predict_fn(model):
  """(state, batch) -> the model's outputs as a dict: {"logits", and for late
  fusion "modality_logits", "modality_present"}, or the contrastive model's
  {"embedding/<m>", ...}."""
  def predict(state: TrainState, batch: dict) -> dict:
    outputs, extra = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, batch,
        train=False, mutable=["intermediates"])
    out = dict(outputs) if isinstance(outputs, dict) else {"logits": outputs}
    sown = extra.get("intermediates", {}).get("fusion", {})
    for key in ("modality_logits", "modality_present"):
      if key in sown:
        out[key] = sown[key][0]
    return out
  return jax.jit(predict)


def evaluator_options(config, options, mesh, predict_fn) -> dict:
  """An evaluator's config options as keyword arguments.

  A `train_split` option becomes `train_batches`, that split's `EvalBatches`;
  a `prompts` option ({"class_names", "templates"}) becomes
  `class_embeddings`, the text tower's prompt-ensembled class embeddings.
  """
  options = configs.to_dict(options)
  prompts = options.pop("prompts", None)
  if prompts:
    tokenizer = pipeline.text_tokenizer(config)
    embed = lambda texts: predict_fn({"text": tokenizer(texts)[0]})[
        "embedding/text"]
    options["class_embeddings"] = class_embeddings_from_prompts(
        embed, prompts["class_names"], prompts["templates"])
  split = options.pop("train_split", None)
  if split:
    options["train_batches"] = pipeline.EvalBatches(
        pipeline.data_source(config, split), config, config.eval_batch_size,
        parallel.batch_sharding(mesh), jax.process_index(),
        jax.process_count())
  return options


def eval_name(dataset: str, split: str) -> str:
  """The `<dataset>` of metric names: "coco_mini", "avmnist_clean_val".

  The dataset name without "tfds:" or version, "/" read as "_", and the split
  appended unless it is "test".
  """
  name = dataset.removeprefix("tfds:").partition(":")[0].replace("/", "_")
  return name if split == "test" else f"{name}_{split}"


def evaluate_splits(config, predict, state, sources: dict, mesh) -> dict:
  """`eval/<dataset>/<evaluator>/<metric>` for every eval split and evaluator
  (`eval_name` gives `<dataset>`)."""
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  results = {}
  for split, source in sources.items():
    batches = pipeline.EvalBatches(source, config, config.eval_batch_size,
                                    parallel.batch_sharding(mesh),
                                    jax.process_index(), jax.process_count())
    predict_fn = lambda batch: predict(state, batch)
    for evaluator, options in config.evaluators.items():
      prefix = f"eval/{eval_name(config.dataset, split)}/{evaluator}/"
      for name, value in evaluators.EVALUATORS[evaluator](
          predict_fn, batches,
          **evaluator_options(config, options, mesh, predict_fn)):
        results[prefix + name] = float(value)
  return results


# ------------------------------------------------------------------- loop ---


def train(config, workdir: str, start_time: float | None = None) -> TrainState:
  """Trains (or resumes) the run in `workdir`; returns the final state."""
  start_time = start_time or time.time()
  mesh = parallel.make_mesh(config.mesh_devices)
  parallel.check_batch_size(config.batch_size, mesh)
  train_source = pipeline.data_source(config, config.train_split)
  eval_sources = {s: pipeline.data_source(config, s)
                  for s in config.eval_splits}
  batch_sharding = parallel.batch_sharding(mesh)
  data = pipeline.TrainIterator(train_source, config, batch_sharding,
                                jax.process_index(), jax.process_count())

  model = build_model(config)
  tx, schedule = build_optimizer(config)
  batch_spec = example_batch_spec(train_source, config, config.batch_size)
  state, shardings = create_train_state(config, model, tx, batch_spec, mesh)
  if config.model.get("init"):
    state = load_pretrained(state, config.model.init)

  writer = metric_writers.MetricWriter(workdir, config.total_steps,
                                       configs.to_dict(config))
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  if ckpt.latest_step() is not None:
    state, data_state = ckpt.restore(state)
    data.set_state(data_state)
    writer.resume(int(state.step))
    writer.info(f"resumed from step {int(state.step)} in {ckpt.directory}")

  predict = make_predict_fn(model)

  def evaluate(state, final: bool) -> dict:
    row = evaluate_splits(config, predict, state, eval_sources, mesh)
    if final:
      row["wall_time_s"] = time.time() - start_time  # this process's run
    return row

  if int(state.step) >= config.total_steps:
    if writer.has_final_row(config.total_steps):
      writer.info(f"already trained for {config.total_steps} steps")
    else:  # stopped during the final evaluation: evaluate, do not train
      writer.info(f"evaluating the final checkpoint, step {int(state.step)}")
      writer.write(int(state.step), evaluate(state, final=True))
    writer.close()
    ckpt.close()
    return state

  balance = imbalance.Balance.from_config(config)
  step_fn = jax.jit(make_train_step(
      model, tx, objectives.make_objective(config.objective, mesh), balance),
                    in_shardings=(shardings, batch_sharding),
                    out_shardings=(shardings, None), donate_argnums=(0,))
  first_batch = next(data)
  compiled = step_fn.lower(state, first_batch).compile()
  flops_per_step = metric_writers.compiled_flops(compiled, mesh.size)
  peak = metric_writers.peak_flops(config.peak_flops)
  # Online G-Blending measures its heads' losses every `every` steps.
  gblend = None
  if balance.method == "gblend":
    gblend = imbalance.GBlendMonitor(
        config, mesh, balance,
        pipeline.data_source(config, balance.options["split"]), train_source)
  if gblend and int(state.step) == 0:
    state, row = gblend.update(state, predict)
    writer.write(0, row)

  step = int(state.step)
  first_step = step
  batch, accumulated = first_batch, None  # first_batch compiled the step
  interval_start, interval_steps = time.time(), 0
  time_to_first_step = None
  try:
    while step < config.total_steps:
      if batch is None:
        batch = next(data)
      state, metrics = compiled(state, batch)
      batch = None
      step += 1
      interval_steps += 1
      accumulated = metrics if accumulated is None else jax.tree.map(
          jnp.add, accumulated, metrics)
      if gblend and step % gblend.every == 0:
        state, row = gblend.update(state, predict)
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
        check_finite(state)
        elapsed = time.time() - interval_start
        row = {f"train/{k}": float(v) / interval_steps
               for k, v in jax.device_get(accumulated).items()}
        row["learning_rate"] = float(schedule(step))
        row["steps_per_sec"] = interval_steps / elapsed
        row["examples_per_sec"] = interval_steps * config.batch_size / elapsed
        row["mfu"] = flops_per_step * interval_steps / elapsed / peak
        if time_to_first_step is not None:
          row["time_to_first_step_s"], time_to_first_step = time_to_first_step, None
          row["num_params"] = sum(x.size for x in jax.tree.leaves(state.params))
          row["train_flops_per_example"] = flops_per_step / config.batch_size
        writer.write(step, row)
        interval_start, interval_steps, accumulated = time.time(), 0, None
      # Checkpoint first: a run stopped during its evaluation keeps the step.
      if step % config.checkpoint_every == 0 or done:
        check_finite(state)
        ckpt.save(step, state, data.get_state())
      if step % config.eval_every == 0 or done:
        check_finite(state)
        writer.write(step, evaluate(state, final=done))
        interval_start = time.time()
  except KeyboardInterrupt:
    writer.info(f"interrupted at step {step}; the latest checkpoint is step "
                f"{ckpt.latest_step()}")
    raise
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  return state


def check_finite(state: TrainState):
  bad = int(jax.device_get(state.nonfinite_step))
  if bad >= 0:
    raise Diverged(f"non-finite loss at step {bad}; training stopped")


def quiet_libraries():
  """Library chatter off: absl warnings, and tfds progress bars unless on a
  terminal, so that errors stay one line."""
  absl_logging.set_verbosity(absl_logging.ERROR)
  if not sys.stderr.isatty():
    tfds.disable_progress_bar()


def main(argv: Sequence[str] | None = None, prog: str = "train") -> int:
  start_time = time.time()
  quiet_libraries()
  # SIGINT stops the run after a checkpoint (KeyboardInterrupt), also when
  # the process was started with SIGINT ignored, as a shell does for a
  # background job: `mmjax.sweep` stops its runs with it.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    config, workdir = parse_command_line(
        sys.argv[1:] if argv is None else argv, prog)
    train(config, workdir, start_time)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Diverged as e:
    print(f"error: {e}; the last good checkpoint is kept in {workdir}",
          file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
