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
