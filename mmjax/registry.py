"""Name lookups for everything a config chooses: a dict, or an import string.

Every registry in mmjax (fusions, encoders, front ends, evaluators, methods,
objectives, ...) is a plain dict from name to object. `lookup` reads a name
from it, and also accepts an import string `package.module:Name` (or
`package.module:Outer.Name`), so that a class defined in a user's package or
a notebook's module trains through `python -m mmjax.train` and
`python -m mmjax.sweep` without editing mmjax:

  --config.model.fusion=my_fusions:GatedFusion

An unknown name raises UsageError naming the config key and listing the known
names; an import string that does not import names the module and the error.
"""

import importlib
from collections.abc import Mapping

from mmjax.errors import UsageError


def is_import_string(name) -> bool:
  """Whether `name` is `module:attribute` (not a registry name)."""
  return isinstance(name, str) and ":" in name


def import_object(spec: str, key: str = "name"):
  """The object that `package.module:Name[.Attr]` names; UsageError (naming
  config key `key`) if the module or the attribute is not there."""
  module_name, _, attribute = spec.partition(":")
  if not module_name or not attribute:
    raise UsageError(f"config key '{key}': '{spec}' is not an import string "
                     "'package.module:Name'")
  try:
    obj = importlib.import_module(module_name)
  except Exception as e:  # ImportError, or an error inside the module
    raise UsageError(f"config key '{key}': cannot import '{module_name}' "
                     f"({type(e).__name__}: {e})") from None
  for part in attribute.split("."):
    if not hasattr(obj, part):
      raise UsageError(f"config key '{key}': module '{module_name}' has no "
                       f"'{attribute}'")
    obj = getattr(obj, part)
  return obj


def check(key: str, name, registry: Mapping):
  """Raises UsageError unless `lookup(key, name, registry)` would succeed."""
  lookup(key, name, registry)


def lookup(key: str, name, registry: Mapping):
  """`registry[name]`, or the object an import string names.

  key: the config key that holds `name` (for the error message).
  """
  if is_import_string(name):
    return import_object(name, key)
  if name not in registry:
    raise UsageError(f"unknown {key} '{name}' (known: "
                     f"{', '.join(sorted(registry))}; or an import string "
                     "'package.module:Name')")
  return registry[name]
