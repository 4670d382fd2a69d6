"""`conv_general_dilated`: `lax.conv_general_dilated` with a faster XLA:CPU
path for a single input channel, for `nn.Conv(conv_general_dilated=...)`.

XLA:CPU runs a convolution with one input channel (a spectrogram or a
grey image entering a CNN: [B, H, W, 1] * [kh, kw, 1, C]) far below the
machine's speed: the AV-MNIST spectrogram LeNet's first 5x5 convolution
(128 x 112 x 112 x 1 -> 6 channels, 0.24 GFLOP) took 87 ms forward. Written
as a sum over the kh * kw shifts of the padded image, each times one row of
the kernel, with the output's width innermost, it is one fused loop XLA
vectorises: 15 ms (benchmarks/README.md). The backward is XLA's own
(`jax.vjp` of `lax.conv_general_dilated`), so gradients are the same
computation as without this path; the forward equals it up to float
rounding (the order of the kh * kw additions).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")


def _single_channel_path(lhs, rhs, window_strides, lhs_dilation, rhs_dilation,
                         dimension_numbers, feature_group_count) -> bool:
  ones = lambda d: d is None or all(v == 1 for v in d)
  return (jax.default_backend() == "cpu" and lhs.ndim == 4
          and lhs.shape[-1] == 1 and rhs.shape[2] == 1
          and feature_group_count == 1 and ones(window_strides)
          and ones(lhs_dilation) and ones(rhs_dilation)
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                         dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))


def _shifted_sum(lhs, rhs, pads):
  """[B, H, W, 1] * [kh, kw, 1, C] -> [B, H', W', C], stride 1."""
  kh, kw = rhs.shape[:2]
  acc = jnp.promote_types(lhs.dtype, jnp.float32)
  image = jnp.pad(lhs[..., 0].astype(acc), ((0, 0), *pads))
  out_h, out_w = image.shape[1] - kh + 1, image.shape[2] - kw + 1
  kernel = rhs[:, :, 0].astype(acc)  # [kh, kw, C]
  out = sum(image[:, None, i:i + out_h, j:j + out_w]
            * kernel[i, j][None, :, None, None]
            for i in range(kh) for j in range(kw))  # [B, C, H', W']
  return out.transpose(0, 2, 3, 1).astype(lhs.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _single_channel_conv(lhs, rhs, pads, precision):
  return _shifted_sum(lhs, rhs, pads)


def _fwd(lhs, rhs, pads, precision):
  return _shifted_sum(lhs, rhs, pads), (lhs, rhs)


def _bwd(pads, precision, residuals, cotangent):
  _, vjp = jax.vjp(lambda lhs, rhs: lax.conv_general_dilated(
      lhs, rhs, (1, 1), pads, dimension_numbers=NHWC, precision=precision),
                   *residuals)
  return vjp(cotangent)


_single_channel_conv.defvjp(_fwd, _bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`'s signature and values. On the CPU, an NHWC
  convolution of a single input channel ([B, H, W, 1] * [kh, kw, 1, C],
  stride 1, no dilation) is computed as a sum of shifted images (see the
  module docstring); everything else goes to `lax.conv_general_dilated`."""
  if (batch_group_count == 1 and preferred_element_type is None
      and _single_channel_path(lhs, rhs, window_strides, lhs_dilation,
                               rhs_dilation, dimension_numbers,
                               feature_group_count)):
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1),
                                    padding)
    pads = tuple(tuple(int(p) for p in pair) for pair in padding)
    return _single_channel_conv(lhs, rhs, pads, precision)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
