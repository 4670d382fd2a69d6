"""Convolutional encoders for images and spectrogram images."""

import flax.linen as nn
import jax.numpy as jnp
from einops import rearrange, reduce

from mmjax.models import conv, norm
from mmjax.models.clip_config import CLIP_MEAN, CLIP_STD
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


CONV_INITS = {"lecun_normal": nn.initializers.lecun_normal,
              "he_uniform": nn.initializers.he_uniform}


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
  `kernel_init` names their initialiser: "lecun_normal" (flax's default) or
  "he_uniform", MultiBench's (`nn.init.kaiming_uniform_`: U(+-sqrt(6 /
  fan_in))).
  """
  features: int = 6
  extra_layers: int = 3
  final_pool: bool = True
  kernel_init: str = "lecun_normal"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    if x.ndim == 3:
      x = x[..., None]
    if self.kernel_init not in CONV_INITS:
      raise ValueError(f"LeNet kernel_init {self.kernel_init!r} is not one of "
                       f"{', '.join(CONV_INITS)}")
    for i in range(self.extra_layers + 1):
      size = 5 if i == 0 else 3
      x = nn.Conv(self.features * 2**i, (size, size), padding="SAME",
                  use_bias=False, kernel_init=CONV_INITS[self.kernel_init](),
                  conv_general_dilated=conv.conv_general_dilated,
                  dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f"conv_{i}")(x)
      x = norm.BatchNorm(use_running_average=not train, momentum=0.9,
                         dtype=self.dtype, param_dtype=self.param_dtype,
                         name=f"bn_{i}")(x)
      x = nn.relu(x)
      if i < self.extra_layers or self.final_pool:
        x = max_pool_2x2(x)
    if x.shape[1] == 0 or x.shape[2] == 0:
      raise ValueError(f"LeNet with {self.extra_layers + 1} poolings needs an "
                       f"input of at least {2**(self.extra_layers + 1)} pixels "
                       "per side")
    return rearrange(x, "b h w c -> b (h w) c")




class PixelNormalize(nn.Module):
  """The image front end: pixels [B, H, W, C] in [0, 1] (uint8 images as
  the models receive them, `mmjax.models.multimodal.modality_input`) ->
  (x - mean) / std per channel, float32 (CLIP's and ImageNet models'
  preprocessing; SigLIP's is mean = std = 0.5, i.e. [-1, 1]).

  Attributes:
    mean, std: per-channel statistics of pixels scaled to [0, 1] (default
      CLIP's).
  """
  mean: tuple[float, ...] = CLIP_MEAN
  std: tuple[float, ...] = CLIP_STD

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = jnp.asarray(x, jnp.float32)
    return ((x - jnp.asarray(self.mean, jnp.float32))
            / jnp.asarray(self.std, jnp.float32))
