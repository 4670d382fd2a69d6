"""Small layers shared by every model."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Dense layers with ReLU between them: [..., D_in] -> [..., features[-1]].

  Attributes:
    features: output width of each Dense layer; no activation after the last.
  """
  features: Sequence[int]

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i, width in enumerate(self.features):
      x = nn.Dense(width, name=f"dense_{i}")(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


def masked_mean(values: jnp.ndarray, present: jnp.ndarray) -> jnp.ndarray:
  """Mean over axis 1 of `values` [B, M, ...], counting only present entries.

  `present` is [B, M] (bool or float weights). Rows where nothing is present
  give zeros rather than NaN.
  """
  weights = present.astype(values.dtype)
  weights = weights.reshape(weights.shape + (1,) * (values.ndim - 2))
  total = jnp.sum(values * weights, axis=1)
  count = jnp.sum(weights, axis=1)
  return total / jnp.maximum(count, 1.0)
