"""Helpers that config files import (and nothing else of mmjax), in the
manner of big_vision's `configs/common.py`.

  from mmjax.configs import common

  def get_config(arg=None):
    args = common.parse_arg(arg, fusion="concat", smoke=False, seed=0)
    config = ml_collections.ConfigDict()
    common.set_data(config, "avmnist", modalities=("image", "audio"))
    ...
    common.set_training(config, batch_size=128, steps=430, smoke=args.smoke)
    return config

Importing this module imports neither jax nor flax, so loading a config is
cheap (and `python -m mmjax.train --config X.py --help` is instant).
"""

from collections.abc import Sequence

import ml_collections

from mmjax import assets
from mmjax.errors import UsageError

# The all-MiniLM-L6-v2 text encoder's architecture (`mmjax.assets`).
MINILM_ENCODER = assets.MINILM_ENCODER
# Ids of `mmjax.data.tokenizer.ByteTokenizer`: 256 bytes after 3 specials.
BYTE_VOCAB_SIZE = 259


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses "fusion=early,smoke" against `defaults` (which fixes keys and types).

  A bare word sets a boolean default to True. Unknown keys raise UsageError
  listing the known ones.
  """
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise UsageError(f"unknown config argument '{key}' "
                       f"(known: {', '.join(sorted(defaults))})")
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise UsageError(f"config argument '{key}' needs a value: {key}=...")
      values[key] = True
    elif isinstance(default, bool):
      values[key] = parse_bool(key, value)
    elif default is None:
      values[key] = value
    else:
      try:
        values[key] = type(default)(value)
      except ValueError:
        raise UsageError(f"config argument '{key}' takes "
                         f"{type(default).__name__} values, got "
                         f"'{value}'") from None
  return ml_collections.ConfigDict(values)


def parse_bool(key: str, value: str) -> bool:
  if value.lower() in ("1", "true", "yes"):
    return True
  if value.lower() in ("0", "false", "no"):
    return False
  raise UsageError(f"config key '{key}' takes true or false, got '{value}'")



def set_training(config: ml_collections.ConfigDict, *, batch_size: int,
                 steps: int, smoke: bool, log_every: int = 50,
                 eval_batch_size: int = 500, checkpoint_every: int = 100):
  """The optimisation, parallelism, logging and checkpoint keys every config
  shares: AdamW 1e-3 (weight decay 1e-4, not on biases and norm scales),
  cosine schedule with 20 warmup steps, data-parallel over all devices,
  evaluation at the end. `smoke` shortens the run to 40 steps (train, eval,
  checkpoint) for a quick check.
  """
  config.batch_size = batch_size
  config.total_steps = 40 if smoke else steps
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-4
  # Parameters without weight decay, a regex over their paths: biases, norm
  # scales, the logit scale and SigLIP's bias (as open_clip excludes them).
  config.optimizer.no_decay = ".*(bias|scale)"
  config.optimizer.momentum = 0.9  # sgd only
  config.optimizer.warmup_steps = 5 if smoke else 20
  config.optimizer.schedule = "cosine"
  config.optimizer.grad_clip_norm = 0.0  # 0 = off
  config.grad_accum_steps = 1  # k > 1: k microbatches per step; 1 = off

  # Precision and memory (mmjax/models/precision.py, layers.py): the compute
  # dtype ("float32", "bfloat16", "float16") and the dtype parameters and
  # optimizer state are kept in; a remat policy for every transformer block
  # ("none" or a jax.checkpoint_policies name such as "nothing_saveable");
  # scan_layers runs ViT/AST/BERT layers with nn.scan (another parameter
  # layout, so off by default).
  config.dtype = "float32"
  config.param_dtype = "float32"
  config.remat = "none"
  config.scan_layers = False

  # Parallelism (mmjax/parallel.py): the mesh over `mesh_devices` devices
  # (0 = all), data x fsdp x model (-1 = the devices the others leave). The
  # batch is split over data and fsdp; parameters and optimizer state over
  # fsdp (and data too with sharding "fsdp"), attention heads and MLP hidden
  # units over model (tensor parallelism). logical_rules: pairs (logical
  # axis name, mesh axis or None) placed before parallel.LOGICAL_RULES,
  # e.g. (("mlp", None),) keeps the MLPs whole.
  config.mesh_devices = 0  # 0 = all devices
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
  config.logical_rules = ()
  config.sharding = "dp"

  config.log_every = 10 if smoke else log_every
  config.eval_every = config.total_steps
  # Checkpoint selection (mmjax/selection.py): a validation metric, e.g.
  # "eval/avmnist_val/classification/accuracy", whose best evaluation's
  # state gives the final row; "" = the last state.
  config.select_best = ml_collections.ConfigDict({"metric": "",
                                                  "mode": "max"})
  config.eval_batch_size = eval_batch_size
  config.checkpoint_every = 20 if smoke else checkpoint_every
  config.keep_checkpoints = 3
  config.peak_flops = 0.0  # 0 = measured on CPU, else the vendor figure
  return config


def set_generation(config: ml_collections.ConfigDict, *,
                   max_new_tokens: int, method: str = "greedy"):
  """A generative model's decoding keys (`mmjax.models.generative.generate`):
  method greedy, beam or sample; beam_size and length_penalty (GNMT's
  ((5 + length) / 6) ** alpha) for beam; temperature, top_k (0 = off) and
  top_p (1 = off) for sample."""
  config.generation = ml_collections.ConfigDict(dict(
      method=method, max_new_tokens=max_new_tokens, beam_size=4,
      length_penalty=0.6, temperature=1.0, top_k=0, top_p=1.0))
  return config


def set_data(config: ml_collections.ConfigDict, dataset: str, *,
             modalities: Sequence[str], eval_splits: Sequence[str] = ("test",),
             train_split: str = "train", audio_length: int = 0,
             data_workers: int = 0) -> ml_collections.ConfigDict:
  """The data keys every config shares.

  dataset: an `mmjax.data.builders` name ("avmnist/clean") or "tfds:NAME".
  modalities: the batch keys the model reads. audio_length: waveform samples
  (0: the record's audio as it is). data_dir "" reads and builds datasets
  under $TFDS_DATA_DIR (or ~/tensorflow_datasets); source_dir "" reads the
  raw files from the repository's data/. shard_groups: how many groups of
  shards a sharded source (webdataset) is read as; 0 is the largest
  divisor of the batch size not above the shard count
  (`pipeline.shard_group_count`).
  """
  config.dataset = dataset
  config.data_dir = ""
  config.source_dir = ""
  config.modalities = tuple(modalities)
  config.audio_length = audio_length
  config.train_split = train_split
  config.eval_splits = tuple(eval_splits)
  config.data_workers = data_workers
  config.shard_groups = 0
  return config
