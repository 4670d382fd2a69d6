"""ResNet v1.5 image encoder returning the final feature map as tokens."""

import functools

import flax.linen as nn
import jax.numpy as jnp
from einops import rearrange

from mmjax.models.precision import Dtype

# depth -> (residual block kind, number of blocks in each of the four stages).
_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}

# He initialisation from the fan-out, as torchvision initialises its convs.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_PAD_1 = ((1, 1), (1, 1))


class _Block(nn.Module):
  """One residual block: [B, H, W, C] -> [B, H/stride, W/stride, out].

  "basic": two 3x3 convolutions, out = `features`. "bottleneck": 1x1 (reduce
  to `features`), 3x3 carrying the stride (v1.5), 1x1 (expand to
  4 * `features`). Each convolution is bias-free and followed by BatchNorm;
  the residual is added before the final ReLU. Where the shape changes the
  shortcut is a projection (strided 1x1 convolution and BatchNorm).
  """
  kind: str
  features: int
  stride: int
  zero_init_residual: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_conv_init,
                             **precision)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, **precision)
    last_scale = (nn.initializers.zeros if self.zero_init_residual
                  else nn.initializers.ones)
    strides = (self.stride, self.stride)
    if self.kind == "basic":
      out = self.features
      y = conv(out, (3, 3), strides, padding=_PAD_1, name="conv_0")(x)
      y = nn.relu(norm(name="bn_0")(y))
      y = conv(out, (3, 3), padding=_PAD_1, name="conv_1")(y)
      y = norm(scale_init=last_scale, name="bn_1")(y)
    else:
      out = 4 * self.features
      y = conv(self.features, (1, 1), name="conv_0")(x)
      y = nn.relu(norm(name="bn_0")(y))
      y = conv(self.features, (3, 3), strides, padding=_PAD_1,
               name="conv_1")(y)
      y = nn.relu(norm(name="bn_1")(y))
      y = conv(out, (1, 1), name="conv_2")(y)
      y = norm(scale_init=last_scale, name="bn_2")(y)
    if self.stride != 1 or x.shape[-1] != out:
      x = conv(out, (1, 1), strides, padding="VALID", name="shortcut_conv")(x)
      x = norm(name="shortcut_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet v1.5 backbone: image -> final feature-map tokens [B, H'*W', C].

  He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition",
  CVPR 2016, in the "v1.5" form of torchvision, which puts the stride-2 of a
  bottleneck block on its 3x3 convolution rather than on the first 1x1. Four
  stages of `width * (1, 2, 4, 8)` channels (times 4 for bottleneck blocks),
  the first at stride 1 and the others at stride 2. Without the classifier the
  parameter counts equal torchvision's `resnet18/34/50` minus its fc layer.

  Attributes:
    depth: 18 or 34 (basic blocks, [2,2,2,2] / [3,4,6,3]) or 50 (bottleneck
      blocks, [3,4,6,3]).
    width: channels of the stem and the first stage (64 in the paper).
    stem: "imagenet" (7x7 stride-2 convolution, BatchNorm, ReLU, 3x3 stride-2
      max pooling: 224x224 -> 56x56) or "cifar" (one 3x3 stride-1 convolution
      with BatchNorm and ReLU, no pooling; for small images such as 28x28).
    zero_init_residual: initialise the last BatchNorm scale of every residual
      block to zero, so that each block starts as its shortcut (Goyal et al.,
      "Accurate, Large Minibatch SGD", 2017).

  Input [B, H, W] or [B, H, W, C] floats; output [B, H' * W', C_final], the
  final feature map flattened without pooling (C_final = 8 * width for depth
  18/34 and 32 * width for 50; H' = H / 32 with the imagenet stem, H / 8 with
  the cifar stem, rounded up). Convolutions compute in `dtype` (the output
  is `dtype`; BatchNorm statistics in float32), parameters in `param_dtype`.
  """
  depth: int = 18
  width: int = 64
  stem: str = "imagenet"
  zero_init_residual: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    if self.depth not in _DEPTHS:
      raise ValueError(f"Unknown ResNet depth {self.depth}; known depths: "
                       f"{sorted(_DEPTHS)}")
    if self.stem not in ("imagenet", "cifar"):
      raise ValueError(f"Unknown ResNet stem {self.stem!r}; expected "
                       "'imagenet' or 'cifar'")
    kind, stage_sizes = _DEPTHS[self.depth]
    if x.ndim == 3:
      x = x[..., None]
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_conv_init,
                             **precision)
    if self.stem == "imagenet":
      x = conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)),
               name="stem_conv")(x)
    else:
      x = conv(self.width, (3, 3), padding=_PAD_1, name="stem_conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     name="stem_bn", **precision)(x)
    x = nn.relu(x)
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD_1)
    for i, num_blocks in enumerate(stage_sizes):
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = _Block(kind, self.width * 2**i, stride, self.zero_init_residual,
                   name=f"stage_{i}_block_{j}", **precision)(x, train=train)
    return rearrange(x, "b h w c -> b (h w) c")
