"""`mmjax.models.norm.BatchNorm` against flax's `nn.BatchNorm`: the same
variables, outputs, running averages and gradients, in training and in
evaluation, on both sides of `GRAM_MAX_CHANNELS`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import norm


@pytest.mark.parametrize("channels", [6, norm.GRAM_MAX_CHANNELS + 16])
def test_batch_norm_matches_flax(channels):
  rng = np.random.default_rng(channels)
  x = jnp.asarray(rng.normal(2.0, 3.0, (4, 9, 7, channels)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  ours = norm.BatchNorm(use_running_average=False, momentum=0.9)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
  init = flax_bn.init(jax.random.PRNGKey(0), x)
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(0), x))
          == jax.tree.map(jnp.shape, init))
  variables = {"params": {"scale": jnp.asarray(rng.normal(size=channels)),
                          "bias": jnp.asarray(rng.normal(size=channels))},
               "batch_stats": init["batch_stats"]}
  variables = jax.tree.map(lambda v: v.astype(jnp.float32), variables)

  def loss(module):
    def f(params, x):
      y, stats = module.apply({**variables, "params": params}, x,
                              mutable=["batch_stats"])
      return (y * cotangent).sum(), (y, stats)
    return jax.grad(f, (0, 1), has_aux=True)(variables["params"], x)

  (grads, (y, stats)), (flax_grads, (flax_y, flax_stats)) = (
      loss(ours), loss(flax_bn))
  np.testing.assert_allclose(y, flax_y, atol=2e-6)
  for a, b in zip(jax.tree.leaves((stats, grads)),
                  jax.tree.leaves((flax_stats, flax_grads))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-5)
  # The running averages moved: momentum 0.9 towards the batch's statistics.
  np.testing.assert_allclose(stats["batch_stats"]["mean"],
                             0.1 * x.reshape(-1, channels).mean(0), rtol=1e-5)
  evaluation = {**variables, **stats}
  np.testing.assert_allclose(
      norm.BatchNorm(use_running_average=True).apply(evaluation, x),
      nn.BatchNorm(use_running_average=True).apply(evaluation, x), atol=2e-6)


def test_batch_norm_keeps_float32_statistics_for_bfloat16():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 5, 6)),
                  jnp.bfloat16)
  module = norm.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
  variables = module.init(jax.random.PRNGKey(0), x)
  y, stats = module.apply(variables, x, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(stats))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
