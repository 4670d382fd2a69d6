"""`mmjax.models.conv.conv_general_dilated`: the single-input-channel path
gives `lax.conv_general_dilated`'s values and gradients; other convolutions
go to lax unchanged."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mmjax.models import conv


def numpy_conv(x, w, pads):
  """Direct NHWC cross-correlation, stride 1: the independent reference."""
  x = np.pad(x, ((0, 0), *pads, (0, 0)))
  kh, kw = w.shape[:2]
  out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = np.zeros((x.shape[0], out_h, out_w, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum("bhwi,io->bhwo", x[:, i:i + out_h, j:j + out_w],
                       w[i, j].astype(np.float64))
  return out


@pytest.mark.parametrize("padding,kernel,pads", [
    ("SAME", 5, ((2, 2), (2, 2))), ("VALID", 3, ((0, 0), (0, 0))),
    ("SAME", 4, ((1, 2), (1, 2))), (((1, 2), (0, 3)), 3, ((1, 2), (0, 3)))])
def test_single_channel_values_and_gradients_match_lax(padding, kernel, pads):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 13, 11, 1)).astype(np.float32)
  w = rng.normal(size=(kernel, kernel, 1, 5)).astype(np.float32)
  def fn(impl):
    return lambda x, w: impl(x, w, (1, 1), padding,
                             dimension_numbers=conv.NHWC)
  ours = fn(conv.conv_general_dilated)
  np.testing.assert_allclose(ours(x, w), numpy_conv(x, w, pads), rtol=1e-5,
                             atol=1e-5)
  # The path is taken: the forward has no XLA convolution.
  assert "conv_general_dilated" not in str(jax.make_jaxpr(ours)(x, w))
  cotangent = rng.normal(size=ours(x, w).shape).astype(np.float32)
  for a, b in zip(jax.vjp(ours, x, w)[1](cotangent),
                  jax.vjp(fn(lax.conv_general_dilated), x, w)[1](cotangent)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_other_convolutions_go_to_lax():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 9, 9, 3)).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  for strides in [(1, 1), (2, 2)]:
    ours = lambda x, w, s=strides: conv.conv_general_dilated(
        x, w, s, "SAME", dimension_numbers=conv.NHWC)
    assert "conv_general_dilated" in str(jax.make_jaxpr(ours)(x, w))
    np.testing.assert_array_equal(ours(x, w), lax.conv_general_dilated(
        x, w, strides, "SAME", dimension_numbers=conv.NHWC))
  # One input channel with stride 2 is not the path either.
  x1, w1 = x[..., :1], w[:, :, :1]
  strided = lambda x, w: conv.conv_general_dilated(
      x, w, (2, 2), "SAME", dimension_numbers=conv.NHWC)
  assert "conv_general_dilated" in str(jax.make_jaxpr(strided)(x1, w1))


def test_flax_conv_with_it_has_the_same_parameters_and_outputs():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 1)),
                  jnp.float32)
  plain = nn.Conv(6, (5, 5), use_bias=False)
  fast = nn.Conv(6, (5, 5), use_bias=False,
                 conv_general_dilated=conv.conv_general_dilated)
  variables = plain.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, fast.init(jax.random.PRNGKey(0), x)) == \
      jax.tree.map(jnp.shape, variables)
  np.testing.assert_allclose(fast.apply(variables, x),
                             plain.apply(variables, x), rtol=1e-5, atol=1e-5)
