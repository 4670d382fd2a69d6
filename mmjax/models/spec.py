"""Modules from config specs: {"name": <registry name or import string>, ...}.

A spec names a class in a registry dict (`ENCODERS`, `FRONTENDS`, ...) or by
import string `package.module:Name` (`mmjax.registry.lookup`); its other
entries are the constructor's keyword arguments.
"""

from collections.abc import Mapping

from mmjax import registry
from mmjax.errors import UsageError


def from_spec(key: str, spec: Mapping, known: Mapping, **extra):
  """`lookup(spec["name"])(**rest_of_spec, **extra)`.

  Args:
    key: the config key that holds `spec` (for error messages), e.g.
      "model.encoders.image"; its name is looked up as `<key>.name`.
    spec: {"name": ..., **kwargs}.
    known: the registry, name -> class (or factory).
    **extra: further keyword arguments (e.g. `name=` of the Flax module).

  Raises:
    UsageError: `spec` has no "name", or the name is unknown.
  """
  if "name" not in spec:
    raise UsageError(f"config key '{key}' needs a 'name' (known: "
                     f"{', '.join(sorted(known))})")
  cls = registry.lookup(f"{key}.name", spec["name"], known)
  return cls(**{k: v for k, v in spec.items() if k != "name"}, **extra)
