"""`BatchNorm`: flax's `nn.BatchNorm` (same variables, same values) whose
per-channel sums of products are matrix products, for few channels.

Ioffe & Szegedy, "Batch Normalization", ICML 2015: in training, with the
batch statistics over every axis but the last (n rows of c channels),

  mean = sum(x) / n,  var = sum(x * x) / n - mean**2,  r = (var + eps)**-1/2
  y = (x - mean) * r * scale + bias

and the backward pass (g = dL/dy; sums over the n rows):

  dbias = sum(g),  dscale = (sum(g * x) - mean * dbias) * r
  dx = scale * r * (g - dbias / n - (x - mean) * r * dscale / n)

XLA:CPU turns a large reduction into a `reduce-window` tree that cannot
fuse its operand, so `sum(x * x)` and `sum(g * x)` first write the whole
product to memory and then reduces it: 9 ms each for the AV-MNIST
spectrogram LeNet's first [128, 112, 112, 6] feature map, against 5-7 ms
for the same sums as the diagonal of a [c, n] x [n, c] matrix product; the
train step is 4-8% faster (benchmarks/README.md). This module computes the
forward and a custom backward by the formulas above, with both sums as Gram
diagonals for c <= `GRAM_MAX_CHANNELS` (beyond, the Gram matrix would cost c
times the work, and they are elementwise products and sums).

Variables as `nn.BatchNorm`'s (`params`: scale, bias; `batch_stats`: mean,
var, the biased batch variance averaged with `momentum`), so checkpoints
are interchangeable. Statistics in float32, the output in `dtype`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.precision import Dtype

GRAM_MAX_CHANNELS = 32


def _channel_dot(a, b):
  """[n, c], [n, c] -> [c]: the sum over rows of a * b; as diag(a^T b) for
  at most `GRAM_MAX_CHANNELS` channels."""
  if a.shape[1] > GRAM_MAX_CHANNELS:
    return (a * b).sum(0)
  return jnp.diagonal(jnp.einsum("nc,nd->cd", a, b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize(x, scale, bias, epsilon):
  return _normalize_fwd(x, scale, bias, epsilon)[0]


def _normalize_fwd(x, scale, bias, epsilon):
  """x [n, c] float32 -> ((y, mean, var), residuals)."""
  n = x.shape[0]
  mean = x.sum(0) / n
  var = jnp.maximum(0.0, _channel_dot(x, x) / n - mean * mean)
  r = jax.lax.rsqrt(var + epsilon)
  y = (x - mean) * (r * scale) + bias
  return (y, mean, var), (x, scale, mean, r)


def _normalize_bwd(epsilon, residuals, cotangents):
  del epsilon
  x, scale, mean, r = residuals
  g = cotangents[0]  # the statistics feed only the running averages
  n = x.shape[0]
  dbias = g.sum(0)
  dscale = (_channel_dot(g, x) - mean * dbias) * r
  dx = (scale * r) * (g - dbias / n - (x - mean) * (r * dscale / n))
  return dx, dscale, dbias


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


class BatchNorm(nn.Module):
  """[..., C] -> [..., C], normalised over every axis but the last.

  `use_running_average`: normalise with the running averages (evaluation)
  instead of the batch's statistics (training, which updates them).
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean",
                            lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var",
                           lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    dtype = self.dtype or x.dtype
    stats = jnp.promote_types(x.dtype, jnp.float32)
    scale, bias = scale.astype(stats), bias.astype(stats)
    rows = x.reshape(-1, c).astype(stats)
    if self.use_running_average:
      y = ((rows - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
           * scale + bias)
    else:
      y, mean, var = _normalize(rows, scale, bias, self.epsilon)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(
            mean)
        ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
    return y.reshape(x.shape).astype(dtype)
