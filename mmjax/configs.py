"""Config helpers: the `file.py:args` convention, overrides, validation.

A config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`.
`arg` is the text after the colon in `--config configs/X.py:fusion=late,smoke`:
a comma list of `key=value` pairs and bare flags. Configs are locked, so an
override that names a missing key is an error, never a new field.
"""

import ast
import importlib.util
import pathlib
from collections.abc import Mapping, Sequence

import ml_collections

from mmjax.errors import UsageError


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
      values[key] = _parse_bool(key, value)
    else:
      values[key] = type(default)(value) if default is not None else value
  return ml_collections.ConfigDict(values)


def _parse_bool(key: str, value: str) -> bool:
  if value.lower() in ("1", "true", "yes"):
    return True
  if value.lower() in ("0", "false", "no"):
    return False
  raise UsageError(f"config key '{key}' takes true or false, got '{value}'")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` and returns the locked config."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise UsageError(f"config file not found: {path}")
  module_spec = importlib.util.spec_from_file_location(
      f"mmjax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UsageError(f"config file {path} defines no get_config(arg)")
  config = module.get_config(arg or None)
  config.lock()
  return config


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies `KEY=VALUE` strings (dotted keys) to the locked `config`."""
  for item in overrides:
    key, eq, text = item.partition("=")
    if not eq:
      raise UsageError(f"override '--config.{item}' needs a value: "
                       f"--config.{key}=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise UsageError(f"unknown config key '{'.'.join(parents[:i + 1])}'")
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      known = ", ".join(sorted(node.keys())) if isinstance(
          node, ml_collections.ConfigDict) else ""
      raise UsageError(f"unknown config key '{key}' (known: {known})")
    old = node[leaf]
    if isinstance(old, bool):
      value = _parse_bool(key, text)
    elif isinstance(old, str) or old is None:
      value = text if isinstance(old, str) else _literal(text)
    else:
      value = _literal(text)
      if isinstance(old, tuple) and isinstance(value, (list, str, int, float)):
        value = tuple(value) if isinstance(value, list) else (value,)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise UsageError(f"config key '{key}': cannot set {text!r} "
                       f"({type(old).__name__} expected)") from e
  return config


def check_choice(key: str, value: str, known: Mapping | Sequence):
  """Raises UsageError unless `value` is one of `known` (listing them)."""
  if value not in known:
    raise UsageError(f"unknown {key} '{value}' (known: "
                     f"{', '.join(sorted(known))})")


def to_dict(config) -> dict:
  """A plain-dict copy of a ConfigDict (tuples as lists), for JSON."""
  if isinstance(config, ml_collections.ConfigDict):
    return {k: to_dict(v) for k, v in config.items()}
  if isinstance(config, (tuple, list)):
    return [to_dict(v) for v in config]
  return config


def set_training(config: ml_collections.ConfigDict, *, batch_size: int,
                 steps: int, smoke: bool, log_every: int = 50,
                 eval_batch_size: int = 500, checkpoint_every: int = 100):
  """The optimisation, parallelism, logging and checkpoint keys every config
  shares: AdamW 1e-3 (weight decay 1e-4), cosine schedule with 20 warmup
  steps, data-parallel over all devices, evaluation at the end. `smoke`
  shortens the run to 40 steps (train, eval, checkpoint) for a quick check.
  """
  config.batch_size = batch_size
  config.total_steps = 40 if smoke else steps
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.momentum = 0.9  # sgd only
  config.optimizer.warmup_steps = 5 if smoke else 20
  config.optimizer.schedule = "cosine"
  config.optimizer.grad_clip_norm = 0.0  # 0 = off

  config.mesh_devices = 0  # 0 = all devices
  config.sharding = "dp"

  config.log_every = 10 if smoke else log_every
  config.eval_every = config.total_steps
  config.eval_batch_size = eval_batch_size
  config.checkpoint_every = 20 if smoke else checkpoint_every
  config.keep_checkpoints = 3
  config.peak_flops = 0.0  # 0 = from the device table in metric_writers.py
  return config
