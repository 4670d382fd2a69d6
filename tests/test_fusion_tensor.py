"""Tensor, low-rank tensor and hybrid fusion: the math, against NumPy.

The contract every fusion keeps (shapes, gradients, masks) is in
test_fusion_contract.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.fusion.tensor import (HybridFusion, LowRankTensorFusion,
                                        TensorFusion)
from mmjax.models.layers import MLP

import test_fusion_contract as contract

# Modality name -> (tokens N, width D); different N and D on purpose.
SHAPES = {"audio": (3, 5), "image": (4, 6), "text": (2, 3)}
B = 3


def make_inputs(names=tuple(SHAPES), seed=0, present=None):
  tokens = contract.make_tokens({m: SHAPES[m] for m in names}, B, seed)
  masks = {m: jnp.asarray(np.ones(B, bool) if present is None else present[m])
           for m in names}
  return tokens, masks


def init(module, tokens, masks):
  return module.init(jax.random.key(0), tokens, masks, train=False)


def _projections(params, tokens, masks):
  """z_m = [Dense(pooled); 1] in NumPy, a masked h_m set to zero."""
  zs = []
  for m in sorted(tokens):
    dense = params[f"proj_{m}"]
    h = np.asarray(tokens[m]).mean(1) @ np.asarray(dense["kernel"])
    h = (h + np.asarray(dense["bias"])) * np.asarray(masks[m])[:, None]
    zs.append(np.concatenate([h, np.ones((h.shape[0], 1))], 1))
  return zs


@pytest.mark.parametrize("names", [("audio", "image"),
                                   ("audio", "image", "text")])
def test_tensor_fusion_is_the_outer_product(names):
  present = {"audio": np.array([True, True, False]),
             "image": np.array([True, False, True]),
             "text": np.array([True, True, True])}
  tokens, masks = make_inputs(names, present=present)
  module = TensorFusion(dim=3)
  variables = init(module, tokens, masks)
  out = np.asarray(module.apply(variables, tokens, masks))
  zs = _projections(variables["params"], tokens, masks)
  expected = np.stack([
      functools.reduce(np.multiply.outer, [z[b] for z in zs]).ravel()
      for b in range(B)])
  assert out.shape == (B, 4**len(names))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_tensor_fusion_missing_modality_keeps_the_others_terms():
  # Image missing in example 0: the product equals the audio-text tensor
  # fusion placed at the image's constant-1 slice, zero elsewhere.
  present = {"audio": np.ones(B, bool), "image": np.array([False, True, True]),
             "text": np.ones(B, bool)}
  tokens, masks = make_inputs(present=present)
  module = TensorFusion(dim=3)
  variables = init(module, tokens, masks)
  out = np.asarray(module.apply(variables, tokens, masks))[0].reshape(4, 4, 4)
  audio, _, text = _projections(variables["params"], tokens, masks)
  np.testing.assert_allclose(out[:, -1, :], np.outer(audio[0], text[0]),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[:, :-1, :], 0)


def test_low_rank_every_parameter_gets_a_gradient():
  tokens, masks = make_inputs()
  module = LowRankTensorFusion(rank=3, out_dim=7)
  params = init(module, tokens, masks)["params"]
  assert sorted(params) == ["factor_audio", "factor_image", "factor_text",
                            "fusion_bias", "fusion_weights"]
  for m, (_, d) in SHAPES.items():
    assert params[f"factor_{m}"].shape == (3, d + 1, 7)
  grads = jax.grad(lambda p: jnp.sum(
      module.apply({"params": p}, tokens, masks) ** 2))(params)
  for key, grad in grads.items():
    assert float(jnp.abs(grad).sum()) > 0, key
    assert np.all(np.abs(np.asarray(grad)).sum(axis=-1) > 0), key


@pytest.mark.parametrize("names", [("audio", "image"),
                                   ("audio", "image", "text")])
def test_low_rank_equals_full_tensor_with_reconstructed_weights(names):
  present = {"audio": np.array([True, True, False]),
             "image": np.array([True, False, True]),
             "text": np.array([True, True, True])}
  tokens, masks = make_inputs(names, present=present)
  module = LowRankTensorFusion(rank=3, out_dim=7)
  params = init(module, tokens, masks)["params"]
  # Non-trivial fusion weights and bias (the bias starts at zero).
  rng = np.random.default_rng(2)
  params = dict(params, fusion_weights=jnp.asarray(rng.normal(size=(1, 3)),
                                                   jnp.float32),
                fusion_bias=jnp.asarray(rng.normal(size=(1, 7)), jnp.float32))
  out = np.asarray(module.apply({"params": params}, tokens, masks))

  # The full TFN tensor Z [B, K_1, ..., K_M] of z_m = [h_m; 1].
  zs = []
  for m in names:
    h = np.asarray(tokens[m], np.float64).mean(1) * present[m][:, None]
    zs.append(np.concatenate([h, np.ones((B, 1))], 1))
  z_full = np.stack([functools.reduce(np.multiply.outer, [z[b] for z in zs])
                     for b in range(B)])
  # W [K_1, ..., K_M, out] = sum_r w_r * (W_1[r] (x) ... (x) W_M[r]), the
  # outer product over the K axes, elementwise over the output axis.
  factors = [np.asarray(params[f"factor_{m}"], np.float64) for m in names]
  w = np.asarray(params["fusion_weights"], np.float64)[0]
  full = 0
  for r in range(3):
    term = 1
    for i, f in enumerate(factors):
      shape = [1] * len(factors) + [7]
      shape[i] = f.shape[1]
      term = term * f[r].reshape(shape)
    full = full + w[r] * term
  expected = (z_full.reshape(B, -1) @ full.reshape(-1, 7) +
              np.asarray(params["fusion_bias"], np.float64))
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_low_rank_factors_start_as_the_reference_xavier_normal():
  """The authors' code draws each factor [rank, D_m + 1, out] with torch's
  `xavier_normal_`: fan_in = (D_m + 1) * out, fan_out = rank * out, so
  std = sqrt(2 / (fan_in + fan_out)); `fusion_weights` [1, rank] with fans
  rank and 1."""
  rank, width, out = 4, 48, 64
  tokens = {"audio": jnp.ones((2, 1, width)), "image": jnp.ones((2, 1, width))}
  masks = {m: jnp.ones(2, bool) for m in tokens}
  params = init(LowRankTensorFusion(rank=rank, out_dim=out), tokens,
                masks)["params"]
  for m in tokens:
    factor = np.asarray(params[f"factor_{m}"])
    fan_in, fan_out = factor.shape[1] * out, rank * out
    assert factor.shape[0] == rank and factor.shape[2] == out
    np.testing.assert_allclose(factor.std(), np.sqrt(2 / (fan_in + fan_out)),
                               rtol=0.03)
    assert np.abs(factor).max() > 2.5 * factor.std()  # not truncated at 2 sd
  weights = np.asarray(params["fusion_weights"])
  assert weights.shape == (1, rank)


def test_hybrid_starts_as_the_mean_of_intermediate_and_late():
  present = {"audio": np.array([True, False, False]),
             "image": np.array([True, True, False]),
             "text": np.array([True, True, False])}
  tokens, masks = make_inputs(present=present)
  module = HybridFusion(num_classes=5, hidden=(8,))
  assert HybridFusion.returns_logits
  variables = init(module, tokens, masks)
  params = variables["params"]
  assert float(params["mix"]) == 0.0
  out, state = module.apply(variables, tokens, masks,
                            mutable=["intermediates"])
  sown = state["intermediates"]
  names = sorted(SHAPES)
  pooled = [np.asarray(tokens[m]).mean(1) * present[m][:, None]
            for m in names]
  head = MLP((8, 5))
  intermediate = head.apply({"params": params["head_intermediate"]},
                            jnp.asarray(np.concatenate(pooled, 1)))
  per_modality = np.stack([
      head.apply({"params": params[f"head_{m}"]}, jnp.asarray(h))
      for m, h in zip(names, pooled)], 1)
  np.testing.assert_allclose(sown["modality_logits"][0], per_modality,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(sown["modality_present"][0],
                                np.stack([present[m] for m in names], 1))
  np.testing.assert_allclose(sown["intermediate_logits"][0], intermediate,
                             rtol=1e-5, atol=1e-5)
  weights = np.stack([present[m] for m in names], 1).astype(np.float32)
  late = (np.einsum("bm,bmk->bk", weights, per_modality) /
          np.maximum(weights.sum(1), 1)[:, None])
  np.testing.assert_allclose(out, 0.5 * (intermediate + late), rtol=1e-5,
                             atol=1e-5)
  # Example 2 has no modality: the late branch is zero.
  np.testing.assert_allclose(out[2], 0.5 * intermediate[2], rtol=1e-5,
                             atol=1e-6)
