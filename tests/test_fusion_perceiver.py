"""Flamingo's Perceiver resampler, gated xattn-dense, PerceiverFusion.

The contract every fusion keeps (shapes, gradients, masks) is in
test_fusion_contract.py; these are the Perceiver's own checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.fusion.perceiver import (GatedCrossAttentionDense,
                                           PerceiverFusion, PerceiverResampler)

import test_fusion_contract as contract

SHAPES = {"audio": (5, 12), "image": (3, 8), "text": (7, 16)}


def make_inputs(b=3, seed=0, names=("audio", "image")):
  tokens = contract.make_tokens({m: SHAPES[m] for m in names}, b, seed)
  masks = {m: jnp.ones(b, bool) for m in names}
  return tokens, masks


def test_fusion_default_projection_width():
  tokens, masks = make_inputs()
  shapes = jax.eval_shape(PerceiverFusion().init, jax.random.key(0), tokens,
                          masks)
  assert shapes["params"]["proj_audio"]["kernel"].shape == (12, 64)


def test_fusion_three_modalities_with_one_masked_equal_the_other_two():
  """A masked modality's keys get exactly zero attention: it is as if absent."""
  module = PerceiverFusion(dim=16, num_latents=4, num_heads=2)
  apply = jax.jit(module.apply)
  tokens, masks = make_inputs(names=("audio", "image", "text"))
  masks = dict(masks, text=jnp.array([False, True, False]))
  variables = contract.random_params(module, tokens, masks)
  out = apply(variables, tokens, masks)
  assert out.shape == (3, 16) and np.all(np.isfinite(out))
  params = {k: v for k, v in variables["params"].items() if "text" not in k}
  time = params["resampler"]["time_embedding"]
  assert time.shape == (3, 1, 16)  # one embedding per modality
  params["resampler"] = dict(params["resampler"], time_embedding=time[:2])
  pair = {m: tokens[m] for m in ("audio", "image")}
  expected = apply({"params": params}, pair, {m: masks[m] for m in pair})
  np.testing.assert_allclose(out[::2], expected[::2], atol=1e-6)
  assert not np.allclose(out[1], expected[1], atol=1e-4)


@pytest.mark.parametrize("frames,tokens", [(1, 1), (2, 5), (4, 9)])
def test_resampler_output_shape(frames, tokens):
  module = PerceiverResampler(num_latents=6, num_layers=1, num_heads=2)
  x = jnp.ones((2, frames, tokens, 8))
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  assert jax.eval_shape(module.apply, variables, x).shape == (2, 6, 8)


def test_gated_block_is_identity_at_init_and_not_after():
  module = GatedCrossAttentionDense(num_heads=2, mlp_dim=16)
  rng = np.random.default_rng(0)
  y = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  mask = jnp.array([[True, False, True], [False, False, False]])
  variables = jax.jit(module.init)(jax.random.key(0), y, x, mask)
  apply = jax.jit(module.apply)
  assert float(variables["params"]["alpha_xattn"]) == 0.0
  assert float(variables["params"]["alpha_dense"]) == 0.0
  np.testing.assert_array_equal(apply(variables, y, x, mask), y)
  np.testing.assert_array_equal(apply(variables, y, x), y)
  for gate in ("alpha_xattn", "alpha_dense"):
    params = dict(variables["params"], **{gate: jnp.float32(0.5)})
    out = apply({"params": params}, y, x, mask)
    assert not np.allclose(out, y), gate
  # Example 1 sees no visual token: only the dense branch may change it, and
  # the masked visual tokens' content must not matter.
  params = dict(variables["params"], alpha_xattn=jnp.float32(0.5))
  out = apply({"params": params}, y, x, mask)
  np.testing.assert_array_equal(out[1], y[1])
  out_other = apply({"params": params}, y, x.at[:, 1].set(9.0), mask)
  np.testing.assert_array_equal(out_other, out)


# --- An independent NumPy implementation of Flamingo's Figure 5. ----------


def np_layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_attention(q_in, kv_in, p, present):
  """Multi-head attention; present [B, K] selects the keys."""
  project = lambda x, w: np.einsum("bnd,dhe->bnhe", x, w["kernel"]) + w["bias"]
  q = project(q_in, p["query"])
  k, v = project(kv_in, p["key"]), project(kv_in, p["value"])
  logits = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(present[:, None, None, :], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  heads = np.einsum("bhqk,bkhe->bqhe", weights, v)
  return (np.einsum("bqhe,hed->bqd", heads, p["out"]["kernel"]) +
          p["out"]["bias"])


def np_gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_resampler(params, x, mask, num_layers):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  b, t, s, d = x.shape
  x = (x + p["time_embedding"][:t]).reshape(b, t * s, d)
  latents = np.broadcast_to(p["latents"], (b, *p["latents"].shape))
  present = np.concatenate([mask, np.ones(latents.shape[:2], bool)], 1)
  for i in range(num_layers):
    media = np_layer_norm(x, p[f"norm_media_{i}"])
    queries = np_layer_norm(latents, p[f"norm_latents_{i}"])
    kv = np.concatenate([media, queries], 1)
    latents = latents + np_attention(queries, kv, p[f"attention_{i}"], present)
    mlp = p[f"mlp_{i}"]
    h = np_layer_norm(latents, p[f"norm_mlp_{i}"])
    h = np_gelu(h @ mlp["dense_0"]["kernel"] + mlp["dense_0"]["bias"])
    latents = latents + h @ mlp["dense_1"]["kernel"] + mlp["dense_1"]["bias"]
  return np_layer_norm(latents, p["norm_out"])


def test_resampler_matches_numpy_reference():
  module = PerceiverResampler(num_latents=5, num_layers=2, num_heads=2,
                              max_frames=4)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)
  mask = rng.random((3, 12)) < 0.6
  mask[2] = False  # one example sees no media at all
  params = contract.random_params(module, x, mask)["params"]
  with jax.default_matmul_precision("float32"):
    out = jax.jit(module.apply)({"params": params}, x, mask)
  expected = np_resampler(params, x.astype(np.float64), mask, num_layers=2)
  assert out.shape == (3, 5, 8)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_fusion_dropout_uses_the_dropout_rng_when_training():
  module = PerceiverFusion(dim=16, num_latents=4, num_heads=2, dropout=0.5)
  tokens, masks = make_inputs()
  variables = jax.eval_shape(module.init, jax.random.key(0), tokens, masks)
  out = jax.eval_shape(lambda v: module.apply(
      v, tokens, masks, train=True, rngs={"dropout": jax.random.key(1)}),
                       variables)
  assert out.shape == (3, 16)
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda v: module.apply(v, tokens, masks, train=True),
                   variables)
