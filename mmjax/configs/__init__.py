"""Config files: loading `file.py:args`, and `--config.KEY=VALUE` overrides.

A config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`.
`arg` is the text after the colon in `--config configs/X.py:fusion=late,smoke`:
a comma list of `key=value` pairs and bare flags (`common.parse_arg`).
Configs are locked, so an override that names a missing key is an error,
never a new field. Config files import only `mmjax.configs.common` (and
ml_collections): loading one imports neither jax nor flax.

ml_collections' `config_flags.DEFINE_config_file` is not used: it reports an
unknown override key as a bare `AttributeError: 'latents'`, without the flag
or the known keys, and a config file that fails to import as a multi-line
OSError; `apply_overrides` names the dotted key and lists the known ones.
"""

import ast
import importlib.util
import pathlib
import traceback
from collections.abc import Mapping, Sequence

import ml_collections

from mmjax.configs.common import parse_bool
from mmjax.errors import UsageError


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` and returns the locked config.

  A file that is missing, does not compile or raises while it is imported or
  while `get_config` runs gives one UsageError naming the file, the line and
  the exception's message.
  """
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise UsageError(f"config file not found: {path}"
                     + (" (it is a directory)" if file.is_dir() else ""))
  module = load_module(file)
  if not hasattr(module, "get_config"):
    raise UsageError(f"config file {path} defines no get_config(arg)")
  try:
    config = module.get_config(arg or None)
  except UsageError:
    raise
  except Exception as e:  # the config file's own code failed
    raise UsageError(f"config file {path}{_line_in(e, file)}: "
                     f"{type(e).__name__}: {e}") from None
  config.lock()
  return config


def load_module(file: pathlib.Path):
  """Imports a config file as a module; UsageError (file, line, message) if
  it does not compile or its top level raises."""
  module_spec = importlib.util.spec_from_file_location(
      f"mmjax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UsageError(f"config file {file} line {e.lineno}: SyntaxError: "
                     f"{e.msg}") from None
  except Exception as e:
    raise UsageError(f"config file {file}{_line_in(e, file)}: "
                     f"{type(e).__name__}: {e}") from None
  return module


def _line_in(error: Exception, file: pathlib.Path) -> str:
  """" line N" of the innermost frame of `error`'s traceback in `file`."""
  line = ""
  for frame in traceback.extract_tb(error.__traceback__):
    if pathlib.Path(frame.filename).resolve() == file.resolve():
      line = f" line {frame.lineno}"
  return line


def docstring(spec: str) -> str:
  """The module docstring of the config file in `spec` (`path.py[:arg]`)."""
  return load_module(pathlib.Path(spec.partition(":")[0])).__doc__ or ""


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
      value = parse_bool(key, text)
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
