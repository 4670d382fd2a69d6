"""Builds a run from its config: what `train`, `evaluate`, `sweep` and
notebooks share.

  run = experiment.build(config)              # for training
  run = experiment.build(config, training=False)  # for evaluating a checkpoint
  run.state, run.shardings, run.model, run.tx, run.predict, run.method, ...
  metrics = run.evaluate(state)   # {"eval/<dataset>/<evaluator>/<m>": v}

`build` starts the input pipeline first (the sources tell the batch's
shapes), then makes the model (`mmjax.models.factory`), the optimizer, the
training method (`mmjax.methods`) and the train state: shape-first, with
`jax.eval_shape`, so every array is written straight into its sharding.
Evaluators are built once per run (`mmjax.evaluators.build`).
"""

import dataclasses
import math
import re

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax import (checkpoint, configs, evaluators, hardware, methods,
                   objectives, parallel, registry, results, rundir, selection)
from mmjax.data import builders, pipeline
from mmjax.errors import UsageError
from mmjax.models import (causal_lm, clip, generative, gpt2_config,
                          pretrained, siglip, vit_checkpoints)
from mmjax.models.convert import first_mismatch
from mmjax.models.factory import build_model  # noqa: F401 (re-exported)
from mmjax.models.encoders import ENCODERS, FRONTENDS
from mmjax.models.fusion import FUSIONS
from mmjax.models.layers import REMAT_POLICIES, logical_axes
from mmjax.models.multimodal import MISSING, UNIMODAL_HEADS
from mmjax.models.precision import DTYPES


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; saved whole in every checkpoint."""
  step: jnp.ndarray  # int32 scalar: steps completed
  params: dict
  batch_stats: dict
  opt_state: optax.OptState
  rng: jnp.ndarray  # uint32[2], the run's base key; step keys fold in `step`
  nonfinite_step: jnp.ndarray  # int32: first step with a non-finite loss, or -1
  # The training method's state (`mmjax.methods`); {} for most runs.
  method_state: dict = flax.struct.field(default_factory=dict)


# ----------------------------------------------------------------- config ---


def check_config(config):
  """Fails at config time on any unknown name or bad value, one line each."""
  if not config.dataset.startswith(("tfds:", "wds:")):  # not builders
    configs.check_choice("dataset", config.dataset.split("/")[0],
                         builders.BUILDERS)
  configs.check_choice("objective", config.objective, objectives.OBJECTIVES)
  configs.check_choice("optimizer.name", config.optimizer.name, OPTIMIZERS)
  configs.check_choice("optimizer.schedule", config.optimizer.schedule,
                       SCHEDULES)
  configs.check_choice("sharding", config.sharding, parallel.STRATEGIES)
  parallel.mesh_rules(None, config.get("logical_rules", ()))
  selection.check(config)
  if config.get("mesh") is not None:  # names and sizes; the device count
    parallel.mesh_shape(config.mesh)  # when the mesh is made
  # Precision and memory (mmjax.models.precision, mmjax.models.layers).
  configs.check_choice("dtype", config.get("dtype", "float32"), DTYPES)
  configs.check_choice("param_dtype", config.get("param_dtype", "float32"),
                       DTYPES)
  configs.check_choice("remat", config.get("remat", "none"), REMAT_POLICIES)
  if not isinstance(config.get("scan_layers", False), bool):
    raise UsageError(f"config key 'scan_layers' takes true or false, got "
                     f"{config.scan_layers!r}")
  if config.get("scan_layers") and config.model.get("init"):
    raise UsageError("config key 'scan_layers' stacks the layers' "
                     "parameters; pretrained weights ('model.init') load "
                     "into the unrolled layout only")
  for modality in config.modalities:
    if modality not in config.model.encoders:
      raise UsageError(f"config key 'model.encoders' has no encoder for "
                       f"modality '{modality}'")
  for modality, spec in config.model.encoders.items():
    registry.check(f"model.encoders.{modality}.name", spec["name"], ENCODERS)
    if spec.get("frontend"):
      registry.check(f"model.encoders.{modality}.frontend.name",
                     spec["frontend"]["name"], FRONTENDS)
  for name in config.evaluators:
    registry.check("evaluators", name, evaluators.EVALUATORS)
  if config.objective == "supervised":
    check_classifier(config.model)
  elif config.objective in objectives.GENERATIVE:
    check_generative(config)
  elif config.model.get("unimodal_heads", "none") != "none":
    raise UsageError("config key 'model.unimodal_heads' needs objective "
                     "'supervised'")
  methods.check_config(config)
  for key in ("batch_size", "total_steps", "log_every", "eval_every",
              "checkpoint_every", "eval_batch_size"):
    if config[key] <= 0:
      raise UsageError(f"config key '{key}' must be positive, "
                       f"got {config[key]}")
  accum = config.get("grad_accum_steps", 1)  # mmjax.accumulate
  if isinstance(accum, bool) or not isinstance(accum, int) or accum <= 0:
    raise UsageError(f"config key 'grad_accum_steps' must be a positive "
                     f"integer, got {accum!r}")
  if accum > 1:  # each microbatch splits evenly over the data axis
    local_batch = config.batch_size // jax.process_count()
    devices = config.get("mesh_devices", 0) or jax.device_count()
    batch_shards = devices  # what the batch splits over: data x fsdp
    if config.get("mesh") is not None and devices <= jax.device_count():
      shape = parallel.mesh_shape(config.mesh, devices)
      batch_shards = shape[parallel.DATA_AXIS] * shape[parallel.FSDP_AXIS]
    if local_batch % accum:
      raise UsageError(f"config key 'grad_accum_steps' ({accum}) must divide "
                       f"the per-process batch size {local_batch}")
    where = (f"{devices} devices" if batch_shards == devices else
             f"{batch_shards} batch shards (data x fsdp)")
    if (devices <= jax.device_count() and config.batch_size % batch_shards == 0
        and config.batch_size // accum % batch_shards):
      raise UsageError(f"config key 'grad_accum_steps' ({accum}): a "
                       f"microbatch of {config.batch_size // accum} examples "
                       f"is not divisible by the {where} of the mesh")
  if not 0 <= config.optimizer.warmup_steps < config.total_steps:
    raise UsageError(f"config key 'optimizer.warmup_steps' "
                     f"({config.optimizer.warmup_steps}) must be below "
                     f"total_steps ({config.total_steps})")


def check_classifier(model_config):
  """The classifier's keys: fusion, missing, modality dropout, heads."""
  fusion = registry.lookup("model.fusion", model_config.fusion, FUSIONS)
  configs.check_choice("model.missing", model_config.missing, MISSING)
  for modality, rate in model_config.modality_dropout.items():
    if not 0 <= rate < 1:
      raise UsageError(f"config key 'model.modality_dropout.{modality}' "
                       f"must be in [0, 1), got {rate}")
  heads = model_config.get("unimodal_heads", "none")
  configs.check_choice("model.unimodal_heads", heads, UNIMODAL_HEADS)
  if heads != "none" and getattr(fusion, "takes_inputs", False):
    raise UsageError(f"config key 'model.unimodal_heads' needs per-modality "
                     f"encoders; fusion '{model_config.fusion}' has none")


def check_generative(config):
  """A generative model's keys: conditioning, decoder (objective
  captioning), generation, objective_kwargs (coca)."""
  if config.objective == "captioning":
    configs.check_choice("model.conditioning",
                         config.model.get("conditioning", "prefix"),
                         generative.CONDITIONINGS)
    if not config.model.get("decoder"):
      raise UsageError("config key 'model.decoder' is needed by objective "
                       "'captioning'")
  try:
    objectives.objective_of(config, None)
  except (TypeError, ValueError) as e:
    raise UsageError(f"config key 'objective_kwargs': {e}") from None
  options = config.get("generation") or {}
  configs.check_choice("generation.method", options.get("method", "greedy"),
                       generative.DECODING_METHODS)
  if options.get("max_new_tokens", 1) <= 0:
    raise UsageError("config key 'generation.max_new_tokens' must be "
                     "positive")


# ------------------------------------------------------ model & optimizer ---


SCHEDULES = {
    "cosine": lambda lr, warmup, total: optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, total, end_value=0.0),
    "constant": lambda lr, warmup, total: optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
        [warmup]),
}

# (schedule, config.optimizer, weight-decay mask) -> optax transformation.
OPTIMIZERS = {
    "adamw": lambda schedule, c, mask: optax.adamw(
        schedule, weight_decay=c.weight_decay, mask=mask),
    "sgd": lambda schedule, c, mask: optax.chain(
        optax.add_decayed_weights(c.weight_decay, mask),
        optax.sgd(schedule, momentum=c.momentum or None)),
}


# CLIP's bound on the logit scale (the inverse temperature) exp(log_scale).
MAX_LOG_SCALE = math.log(100.0)


def clamp_parameters(tx: optax.GradientTransformation,
                     bounds: dict) -> optax.GradientTransformation:
  """`tx`, with its updates adjusted so that each top-level parameter named
  in `bounds` ({name: (low, high)}) stays inside its bounds after the
  update, as CLIP clamps its logit scale after each step (open_clip
  `main.py`: `logit_scale.clamp_(0, math.log(100))`). The optimizer state is
  `tx`'s own, so checkpoints keep their layout."""
  def update(updates, state, params):
    updates, state = tx.update(updates, state, params)
    updates = dict(updates)
    for name, (low, high) in bounds.items():
      if name in params:
        updates[name] = jnp.clip(params[name] + updates[name], low,
                                 high) - params[name]
    return updates, state
  return optax.GradientTransformation(tx.init, update)


def decay_mask(pattern: str):
  """params -> a tree of bools: weight decay on the leaves whose path
  ("tower_image/encoder/conv_0/kernel") does not fully match `pattern`."""
  regex = re.compile(pattern) if pattern else None
  return lambda params: flax.traverse_util.path_aware_map(
      lambda path, _: not (regex and regex.fullmatch("/".join(path))), params)


def build_optimizer(config):
  """(optax transformation, learning-rate schedule) from `config.optimizer`.

  Weight decay skips the parameters matching `optimizer.no_decay` (default:
  biases, norm scales, the logit scale and SigLIP's bias, as open_clip
  excludes them). With the softmax objective the logit scale is clamped to
  [0, log 100] after every step (CLIP).
  """
  c = config.optimizer
  schedule = SCHEDULES[c.schedule](c.learning_rate, c.warmup_steps,
                                   config.total_steps)
  tx = OPTIMIZERS[c.name](schedule, c, decay_mask(c.get("no_decay", "")))
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
  if config.objective in ("softmax", "coca"):  # CLIP's loss
    tx = clamp_parameters(tx, {"log_scale": (0.0, MAX_LOG_SCALE)})
  return tx, schedule


def example_batch_spec(source, config, batch_size: int) -> dict:
  """ShapeDtypeStructs of one training batch, read off the first example."""
  ds = pipeline.train_transforms(
      grain.MapDataset.source(source)[:1].seed(config.seed), config)
  return {k: jax.ShapeDtypeStruct((batch_size,) + np.shape(v),
                                  np.asarray(v).dtype)
          for k, v in ds[0].items()}


def _subtree(params: dict, path: str, where: str):
  """params at "a/b/c" (UsageError naming `where` if it is not there)."""
  node = params
  for key in path.split("/"):
    if not isinstance(node, dict) or key not in node:
      raise UsageError(f"{where} has no parameters at '{path}'")
    node = node[key]
  return node


def _checkpoint(name: str, path: str, loaded: dict):
  """The whole parameter tree that a "run:", "clip:" or "siglip:" entry
  names (without its "#<path>"), read once per `load_pretrained` call
  (`loaded` holds what was read)."""
  if name not in loaded:
    kind, _, location = name.partition(":")
    readers = {"run": checkpoint.read_params,
               "clip": lambda d: clip.load_clip(d)[1],
               "siglip": lambda d: siglip.load_siglip(d)[1]}
    try:
      loaded[name] = readers[kind](location)
    except (OSError, ValueError) as e:
      raise UsageError(f"config key 'model.init.{path}': {e}") from e
  return loaded[name]


def pretrained_weights(path: str, name: str, loaded: dict | None = None):
  """The weights that `model.init` entry {path: name} names:

    "minilm"        sentence-transformers all-MiniLM-L6-v2's BERT encoder
                    (`mmjax.models.pretrained`);
    "run:<workdir>" the subtree at `path` of another mmjax run's latest
                    checkpoint (e.g. the text-only LM a Flamingo model
                    freezes); "run:<workdir>#<source>" its subtree at
                    <source> instead (e.g. an MNIST classifier's
                    "encoder_image" as a patch encoder's LeNet);
    "clip:<dir>"    the subtree at `path` of a CLIP checkpoint's
                    ContrastiveModel tree (`mmjax.models.clip`: Hugging
                    Face or open_clip), e.g. "tower_image";
    "siglip:<path>" the same of a SigLIP checkpoint (`mmjax.models.siglip`:
                    Hugging Face or big_vision .npz);
    "vit:<path>"    a ViT encoder's weights, for a `ViT` subtree such as
                    "tower_image/encoder" (`mmjax.models.vit_checkpoints`:
                    timm safetensors or big_vision / AugReg .npz);
    "gpt2:<dir>"    a Hugging Face GPT-2 checkpoint as a `TextDecoder`
                    subtree such as "decoder" (`mmjax.models.causal_lm`),
                    its ids moved up by one for padding id 0
                    (`mmjax.models.gpt2_config`; the tokenizer is
                    `text.tokenizer = "gpt2:<dir>"`);
    "llama:<dir>"   the same of a Hugging Face Llama checkpoint
                    (`mmjax.models.llama_config`; `text.tokenizer =
                    "llama:<dir>"`).

  `loaded` caches whole checkpoints between entries that name the same one.
  """
  if name.startswith(("run:", "clip:", "siglip:")):
    location, _, source = name.partition("#") if name.startswith("run:") else (
        name, "", "")
    tree = _checkpoint(location, path, {} if loaded is None else loaded)
    return _subtree(tree, source or path,
                    f"config key 'model.init.{path}': {location}")
  single = {"vit:": lambda d: vit_checkpoints.load_vit(d)[1],
            "gpt2:": lambda d: causal_lm.load_gpt2(
                d, id_offset=gpt2_config.PADDING_OFFSET)[1],
            "llama:": lambda d: causal_lm.load_llama(
                d, id_offset=gpt2_config.PADDING_OFFSET)[1]}
  for prefix, load in single.items():
    if name.startswith(prefix):
      try:
        return load(name[len(prefix):])
      except (OSError, ValueError) as e:
        raise UsageError(f"config key 'model.init.{path}': {e}") from e
  loaders = {"minilm": lambda: pretrained.load_minilm()[1]}
  configs.check_choice(f"model.init.{path}", name,
                       [*loaders, "run:<workdir>", "clip:<dir>",
                        "siglip:<path>", "vit:<path>", "gpt2:<dir>",
                        "llama:<dir>"])
  return loaders[name]()


def load_pretrained(state: TrainState, inits) -> TrainState:
  """Overwrites parameter subtrees with pretrained weights, keeping shardings.

  `inits` maps a parameter path ("tower_text/encoder") to a pretrained
  checkpoint name (`pretrained_weights`); weights that do not fit give a
  UsageError naming the first mismatched parameter. A learned ViT position
  embedding of another grid size is resampled to the model's
  (`vit_checkpoints.resample_posemb`), so a checkpoint fine-tunes at
  another image size.
  """
  params = jax.tree.map(lambda x: x, state.params)  # fresh containers
  loaded = {}
  for path, name in inits.items():
    parent, _, leaf = path.rpartition("/")
    node = _subtree(params, parent, "the model") if parent else params
    if leaf not in node:
      raise UsageError(f"config key 'model.init': the model has no "
                       f"parameters at '{path}'")
    old, new = node[leaf], pretrained_weights(path, name, loaded)
    if isinstance(old, dict):  # a ViT at another image size
      new = vit_checkpoints.fit_posembs(old, new)
    mismatch = (first_mismatch(old, new, path) if isinstance(old, dict) else
                None if np.shape(new) == old.shape else
                f"{path}: expected shape {old.shape}, got {np.shape(new)}")
    if mismatch:
      raise UsageError(f"config key 'model.init.{path}': '{name}' does not "
                       f"fit the model: {mismatch}")
    node[leaf] = jax.tree.map(
        lambda o, n: jax.device_put(np.asarray(n, o.dtype), o.sharding),
        old, new)
  return state.replace(params=params)


def create_train_state(config, model, tx, batch_spec, mesh,
                       method: methods.Method | None = None):
  """Shape-first initialisation: (state, state shardings).

  The state's shapes and its parameters' logical axis names ("embed",
  "heads", "mlp", ...: `mmjax.models.layers.logical_axes`) come from
  `jax.eval_shape`; the shardings from them (`parallel.param_shardings`:
  heads and hidden units along `model`, FSDP, the rules of
  `config.logical_rules` first; the optimizer state as its parameter), and
  the jitted initialiser writes each array straight into its sharding,
  unboxed: the parameters are plain arrays with the tree of `model.init`.
  """
  method = method or methods.Method()

  def init(rng):  # the parameters boxed with their logical axis names
    batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch_spec.items()}
    variables = model.init({"params": rng, "dropout": rng}, batch, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(flax.linen.meta.unbox(params)),
                      rng=rng, nonfinite_step=jnp.full((), -1, jnp.int32),
                      method_state=method.init_state())

  rng = jax.random.PRNGKey(config.seed)
  with logical_axes():
    boxed = jax.eval_shape(init, rng)
    abstract = flax.linen.meta.unbox(boxed)
    params = parallel.param_shardings(
        abstract.params, flax.linen.get_partition_spec(boxed.params), mesh,
        config.sharding, config.get("logical_rules", ()))
    shardings = parallel.state_shardings(abstract, mesh, config.sharding,
                                         params=params)
    state = jax.jit(lambda rng: flax.linen.meta.unbox(init(rng)),
                    out_shardings=shardings)(rng)
  return state, shardings


def make_predict_fn(model, generation=None):
  """(state, batch) -> the model's outputs as a dict: {"logits", and for late
  fusion "modality_logits", "modality_present"}, or the contrastive model's
  {"embedding/<m>", ...}; with `generation` (a generative model's decoding
  options, `mmjax.models.generative.generate`'s keywords) {"tokens" int32
  [B, max_new_tokens]}, the decoded ids."""
  if generation is not None:
    return jax.jit(lambda state, batch: {"tokens": generative.generate(
        model, {"params": state.params, "batch_stats": state.batch_stats},
        batch, **generation)}, compiler_options=hardware.compiler_options())

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
  return jax.jit(predict, compiler_options=hardware.compiler_options())


# -------------------------------------------------------------------- run ---


@dataclasses.dataclass
class Experiment:
  """A run's parts, built from its config (`build`)."""
  config: object
  mesh: jax.sharding.Mesh
  train_source: object
  eval_sources: dict  # split -> random-access source
  model: object
  tx: optax.GradientTransformation
  schedule: object  # step -> learning rate
  method: methods.Method
  state: TrainState
  shardings: TrainState
  predict: object  # jitted (state, batch) -> outputs dict
  evaluators: dict = dataclasses.field(default_factory=dict)

  def data_source(self, split: str):
    return pipeline.data_source(self.config, split)

  def eval_batches(self, source) -> pipeline.EvalBatches:
    """Re-iterable eval batches of `source`, sharded over the mesh."""
    return pipeline.EvalBatches(
        source, self.config, self.config.eval_batch_size,
        parallel.batch_sharding(self.mesh), jax.process_index(),
        jax.process_count())

  def train_iterator(self, seed: int | None = None) -> pipeline.TrainIterator:
    """Training batches, shuffled with `seed` (default `config.seed`)."""
    return pipeline.TrainIterator(
        self.train_source, self.config, parallel.batch_sharding(self.mesh),
        jax.process_index(), jax.process_count(), seed)

  def evaluate(self, state: TrainState) -> dict:
    """`eval/<dataset>/<evaluator>/<metric>` for every eval split and
    evaluator of the config (`results.metric_name`)."""
    predict_fn = lambda batch: self.predict(state, batch)
    row = {}
    for split, batches in self._eval_batches.items():
      for name, evaluator in self.evaluators.items():
        for metric, value in evaluator(predict_fn, batches):
          key = results.metric_name(self.config.dataset, split, name, metric)
          row[key] = float(value)
    return row

  def __post_init__(self):
    self._eval_batches = {s: self.eval_batches(source)
                          for s, source in self.eval_sources.items()}


def generation_options(config, tokenizer=None) -> dict | None:
  """A generative model's decoding options (`config.generation`, with the
  end token from `tokenizer`, by default the config's), or None for other
  models."""
  if config.objective not in objectives.GENERATIVE:
    return None
  options = dict(config.get("generation") or {})
  options.setdefault("max_new_tokens", config.text.max_length)
  tokenizer = tokenizer or pipeline.text_tokenizer(config)
  options.setdefault("eos_id", tokenizer.eos_id)
  return options


def build(config, training: bool = True) -> Experiment:
  """Every part of the run of `config` (module docstring).

  training: False builds no training data iterator and measures nothing for
  the method; the batch shapes come from the first eval split. Whatever can
  be checked before training is: the data directory, the batch sizes
  against the mesh, and that pretrained weights and tokenizers are installed
  (each a one-line UsageError).
  """
  try:
    return _build(config, training)
  except (ModuleNotFoundError, FileNotFoundError) as e:  # pretrained files
    raise UsageError(str(e).splitlines()[0]) from None


def _build(config, training: bool) -> Experiment:
  # First what fails fast: a tokenizer's files, the data directory, the mesh.
  tokenizer = (pipeline.text_tokenizer(config) if config.get("text")
               else None)
  if not config.dataset.startswith(("tfds:", "wds:")):  # built here
    rundir.check_directory(config.data_dir or pipeline.default_data_dir(),
                           "config key 'data_dir':")
  mesh = parallel.make_mesh(config.mesh_devices, config.get("mesh"))
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  eval_sources = {s: pipeline.data_source(config, s)
                  for s in config.eval_splits}
  train_source = (pipeline.data_source(config, config.train_split)
                  if training else None)
  spec_source = train_source if training else next(iter(eval_sources.values()))
  batch_size = config.batch_size if training else config.eval_batch_size
  batch_spec = example_batch_spec(spec_source, config, batch_size)

  model = build_model(config)
  tx, schedule = build_optimizer(config)
  run = Experiment(config, mesh, train_source, eval_sources, model, tx,
                   schedule, methods.Method(), None, None,
                   make_predict_fn(model, generation_options(config,
                                                             tokenizer)))
  run.method = methods.build(config, run if training else None)
  try:
    run.state, run.shardings = create_train_state(config, model, tx,
                                                  batch_spec, mesh, run.method)
  except ValueError as e:  # the model does not fit the data's shapes
    raise UsageError(f"config key 'model': {str(e).splitlines()[0]}") from None
  if config.model.get("init"):
    run.state = load_pretrained(run.state, config.model.init)
  run.evaluators = {
      name: evaluators.build(
          name, options.to_dict() if hasattr(options, "to_dict") else options,
          split_batches=lambda s: run.eval_batches(pipeline.data_source(
              config, s)),
          tokenizer=tokenizer)
      for name, options in config.evaluators.items()}
  return run
