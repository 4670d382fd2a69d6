"""Convolutional encoders for images and spectrogram images."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange, reduce

from mmjax.models.precision import Dtype


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 max pooling, stride 2, VALID (an odd last row or column is dropped).

  [B, H, W, C] -> [B, H // 2, W // 2, C]. The same values as
  `nn.max_pool(x, (2, 2), strides=(2, 2))`, written as a reshape and a max:
  XLA's CPU backward of `reduce_window` (select-and-scatter) was 27% of
  the AV-MNIST spectrogram LeNet's train step (benchmarks/README.md).
  """
  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  return reduce(x[:, :h, :w], "b (h 2) (w 2) c -> b h w c", "max")


def block_taps(kernel_size: int) -> np.ndarray:
  """0/1 array [kb, kb, 2, 2, 2, 2, k, k]: which tap (di, dj) of a SAME k x k
  kernel links output pixel (a, b) of a 2x2 block to input pixel (s, t) of
  the block at offset (r - 1, c - 1): kb = 3 blocks cover every tap for
  k = 3 or 5."""
  pad = kernel_size // 2
  taps = np.zeros((3, 3, 2, 2, 2, 2, kernel_size, kernel_size), np.float32)
  for a in range(2):
    for b in range(2):
      for di in range(kernel_size):
        for dj in range(kernel_size):
          r, s = divmod(a + di - pad, 2)
          c, t = divmod(b + dj - pad, 2)
          taps[r + 1, c + 1, s, t, a, b, di, dj] = 1
  return taps


class BlockConv(nn.Module):
  """A SAME, stride-1, bias-free k x k convolution (k = 3 or 5) computed on
  2x2 pixel blocks (space-to-depth), for single-channel inputs.

  [B, H, W, C] (H, W even) -> [B, H/2, W/2, 2, 2, F]: output pixel
  (2i + a, 2j + b) at [:, i, j, a, b]. The parameter is nn.Conv's (`kernel`
  [k, k, C, F], LeCun normal), and so are the values up to float32 rounding
  (another summation order); the blocks turn a
  1 -> F convolution at full resolution into a 4C -> 4F one at a quarter of
  the positions, which XLA's CPU convolution runs 4x faster forward (the
  AV-MNIST spectrogram LeNet's first layer: benchmarks/README.md), and the
  2x2 pooling after it becomes a max over the block axes.
  """
  features: int
  kernel_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, x.shape[-1], self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    blocks = jnp.einsum("rcstabij,ijxo->rcstxabo",
                        block_taps(k).astype(kernel.dtype), kernel)
    blocks = rearrange(blocks, "r c s t x a b o -> r c (s t x) (a b o)")
    x = rearrange(x, "n (h s) (w t) x -> n h w (s t x)", s=2, t=2)
    y = jax.lax.conv_general_dilated(x, blocks, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO",
                                                        "NHWC"))
    return rearrange(y, "n h w (a b o) -> n h w a b o", a=2, b=2)


class LeNet(nn.Module):
  """The LeNet-style encoder of the MultiBench AV-MNIST recipes.

  Liang et al., "MultiBench: Multiscale Benchmarks for Multimodal Representation
  Learning", NeurIPS 2021 Datasets and Benchmarks (`unimodals/common_models.py`,
  `LeNet(in_channels, args_channels, additional_layers)`):
  a 5x5 convolution with `features` channels, then `extra_layers` 3x3
  convolutions that double the channels; every convolution is bias-free and
  followed by BatchNorm, ReLU and 2x2 max pooling. The image recipe is
  `LeNet(features=6, extra_layers=3)` (28x28 -> [B, 48]); the spectrogram recipe
  `LeNet(features=6, extra_layers=5)` (112x112 -> [B, 192]).

  Input [B, H, W] or [B, H, W, C]; output tokens [B, H' * W', features *
  2**extra_layers], the positions of the last feature map (MultiBench squeezes
  a 1x1 map: one token, whose mean over positions is the same vector). With
  `final_pool=False` the last max pooling is skipped, so token-level fusions
  see a grid of positions: 3x3 = 9 tokens for both recipes above.

  Convolutions compute in `dtype` (the output is `dtype`; BatchNorm
  statistics and running averages in float32), parameters in `param_dtype`.
  `space_to_depth`: a single-channel first layer (even sides, pooled) runs
  as a `BlockConv`, with the same parameters and values (False: nn.Conv).
  """
  features: int = 6
  extra_layers: int = 3
  final_pool: bool = True
  space_to_depth: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    if x.ndim == 3:
      x = x[..., None]
    for i in range(self.extra_layers + 1):
      size = 5 if i == 0 else 3
      pooled = i < self.extra_layers or self.final_pool
      blocked = (self.space_to_depth and pooled and x.shape[-1] == 1
                 and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0)
      conv = BlockConv if blocked else functools.partial(
          nn.Conv, kernel_size=(size, size), padding="SAME", use_bias=False)
      x = conv(features=self.features * 2**i,
               **({"kernel_size": size} if blocked else {}),
               dtype=self.dtype, param_dtype=self.param_dtype,
               name=f"conv_{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                       dtype=self.dtype, param_dtype=self.param_dtype,
                       name=f"bn_{i}")(x)
      x = nn.relu(x)
      if blocked:
        x = x.max(axis=(3, 4))  # the 2x2 pooling: over each block's pixels
      elif pooled:
        x = max_pool_2x2(x)
    if x.shape[1] == 0 or x.shape[2] == 0:
      raise ValueError(f"LeNet with {self.extra_layers + 1} poolings needs an "
                       f"input of at least {2**(self.extra_layers + 1)} pixels "
                       "per side")
    return rearrange(x, "b h w c -> b (h w) c")
