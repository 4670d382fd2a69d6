"""Modules from config specs: {"name": <registry name or import string>, ...}.

A spec names a class in a registry dict (`ENCODERS`, `FRONTENDS`, ...) or by
import string `package.module:Name` (`mmjax.registry.lookup`); its other
entries are the constructor's keyword arguments.
"""

import dataclasses
import functools
from collections.abc import Mapping

from mmjax import registry
from mmjax.errors import UsageError


def fields_of(factory) -> frozenset[str]:
  """The dataclass fields a module class (or a functools.partial of one)
  takes; empty for anything else (a plain factory function)."""
  while isinstance(factory, functools.partial):
    factory = factory.func
  if not dataclasses.is_dataclass(factory):
    return frozenset()
  return frozenset(f.name for f in dataclasses.fields(factory) if f.init)


def supported(factory, options: Mapping | None) -> dict:
  """The entries of `options` (e.g. {"dtype": ..., "param_dtype": ...,
  "remat": ...}) that `factory` declares as fields: what every mmjax module
  takes, passed to a module from outside mmjax only where it has them."""
  fields = fields_of(factory)
  return {k: v for k, v in (options or {}).items() if k in fields}


def from_spec(key: str, spec: Mapping, known: Mapping, *,
              options: Mapping | None = None, **extra):
  """`lookup(spec["name"])(**rest_of_spec, **options, **extra)`.

  Args:
    key: the config key that holds `spec` (for error messages), e.g.
      "model.encoders.image"; its name is looked up as `<key>.name`.
    spec: {"name": ..., **kwargs}.
    known: the registry, name -> class (or factory).
    options: model-wide keyword arguments (compute and parameter dtypes,
      remat policy), passed only where the class declares them as fields
      and the spec does not set them itself (a spec's own entry wins, e.g.
      `"dtype": "float32"` keeps one encoder in float32).
    **extra: further keyword arguments (e.g. `name=` of the Flax module).

  Raises:
    UsageError: `spec` has no "name", or the name is unknown.
  """
  if "name" not in spec:
    raise UsageError(f"config key '{key}' needs a 'name' (known: "
                     f"{', '.join(sorted(known))})")
  cls = registry.lookup(f"{key}.name", spec["name"], known)
  kwargs = {k: v for k, v in spec.items() if k != "name"}
  for k, v in supported(cls, options).items():
    kwargs.setdefault(k, v)
  return cls(**kwargs, **extra)
