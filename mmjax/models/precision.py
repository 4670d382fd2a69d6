"""Mixed precision: dtypes by name and the casts at a model's edges.

Every mmjax module takes two Flax attributes, as flax.linen's own layers do:

  dtype        the compute dtype of its matrix multiplications, convolutions
               and activations (default float32; e.g. bfloat16).
  param_dtype  the dtype its parameters are created and stored in (default
               float32). With dtype=bfloat16 and param_dtype=float32 the
               parameters, their gradients and the optimizer state stay
               float32 and each layer casts its parameters to bfloat16 where
               it uses them.

Kept in float32 whatever `dtype` is: the statistics of LayerNorm and
BatchNorm (flax computes them in at least float32 and casts only the
normalised output to `dtype`), BatchNorm's running averages, the softmax of
every attention (`mmjax.models.layers.attention`), the audio front end's STFT
and log-mel (computed in float32, returned in `dtype`), and the model's
outputs (logits and embeddings are cast to float32 before any loss).

A config names them by string: `config.dtype` and `config.param_dtype`, keys
of `DTYPES`; `mmjax.models.factory` passes them to every module.
"""

from typing import Any

import jax
import jax.numpy as jnp

# Floating dtypes a config may name (config.dtype, config.param_dtype).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}

Dtype = Any  # a jnp dtype (jnp.float32) or a NumPy dtype


def dtype_of(name: str) -> jnp.dtype:
  """`DTYPES[name]` as a NumPy dtype; ValueError naming the known names."""
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r} (known: "
                     f"{', '.join(sorted(DTYPES))})")
  return jnp.dtype(DTYPES[name])


def to_compute(x: jnp.ndarray, dtype: Dtype) -> jnp.ndarray:
  """A floating array cast to `dtype`; integer and boolean arrays unchanged
  (token ids and masks stay what they are). Any shape."""
  if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
    return x.astype(dtype)
  return x


def to_float32(tree):
  """Every floating leaf of a pytree (e.g. the model's output dict) as
  float32; other leaves unchanged. Shapes unchanged."""
  return jax.tree.map(
      lambda x: (x.astype(jnp.float32) if jnp.issubdtype(
          jnp.result_type(x), jnp.floating) and jnp.result_type(x) !=
                 jnp.float32 else x), tree)
