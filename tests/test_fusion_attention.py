"""The attention fusions' own checks: cross-attention, co-attention, MulT.

NumPy references of the layers, wiring and errors; the contract every fusion
keeps (shapes, gradients, masks) is in test_fusion_contract.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.fusion import attention
from mmjax.models.fusion.attention import (CoAttentionFusion,
                                           TransformerBlock,
                                           CrossAttentionFusion, MulTFusion,
                                           sinusoidal_positions)

import test_fusion_contract as contract

BATCH = 4
SHAPES = {"a": (3, 5), "b": (4, 7), "c": (2, 6)}  # name -> (N_m, D_m)
DIM = 8
SMALL = dict(dim=DIM, num_heads=2, mlp_dim=16)

MODULES = {
    "cross_attention": lambda: CrossAttentionFusion(**SMALL),
    "coattention": lambda: CoAttentionFusion(**SMALL),
    "mult": lambda: MulTFusion(**SMALL),
}


def make_tokens(names, seed=0):
  return contract.make_tokens({m: SHAPES[m] for m in names}, BATCH, seed)


def make_masks(names, pattern=None):
  """Boolean masks [B]; by default a mix of present and missing rows."""
  pattern = pattern or {"a": [1, 0, 1, 1], "b": [1, 1, 0, 0],
                        "c": [1, 0, 1, 0]}
  return {m: jnp.array(pattern[m], bool) for m in names}


def jitted(module, params):
  """The module's forward pass as NumPy, one compilation per input shape."""
  apply = jax.jit(module.apply)
  return lambda tokens, masks: np.asarray(apply(params, tokens, masks))


@pytest.mark.parametrize("name", MODULES)
def test_too_few_modalities(name):
  module = MODULES[name]()
  with pytest.raises(ValueError, match="at least 2|exactly two"):
    jax.eval_shape(module.init, jax.random.PRNGKey(0), make_tokens("a"),
                   make_masks("a"))


def test_dropout_only_when_training():
  block = TransformerBlock(num_heads=2, mlp_dim=16, dropout=0.5)
  x, context = make_tokens("ac").values()
  x, context = x[..., :4], context[..., :4]
  present = jnp.array([1, 1, 0, 1], bool)
  params = contract.random_params(block, x, context, present)
  apply = jax.jit(lambda train, rng: block.apply(
      params, x, context, present, train=train, rngs={"dropout": rng}),
                  static_argnums=0)
  eval_out = apply(False, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(apply(False, jax.random.PRNGKey(1)), eval_out)
  assert not np.allclose(apply(True, jax.random.PRNGKey(3)), eval_out)


# NumPy references (float64), written from the equations, reading flax params.


def np_layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def np_dense(x, p):
  return x @ p["kernel"] + p["bias"]


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_attention(xq, xkv, p, present=None):
  """Multi-head attention; `present` [B, K] masks keys; no key -> zeros."""
  q = np.einsum("bnd,dhk->bnhk", xq, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bnd,dhk->bnhk", xkv, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("bnd,dhk->bnhk", xkv, p["value"]["kernel"]) + p["value"]["bias"]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  out = np.zeros(xq.shape[:2] + (p["out"]["kernel"].shape[-1],))
  for i in range(xq.shape[0]):
    keys = slice(None) if present is None else present[i].astype(bool)
    if not np.any(np.ones(xkv.shape[1], bool)[keys]):
      continue  # no key: the attention output is zero
    weights = np_softmax(logits[i][:, :, keys])  # [H, Q, K']
    heads = np.einsum("hqk,khd->qhd", weights, v[i][keys])
    out[i] = np.einsum("qhd,hde->qe", heads, p["out"]["kernel"])
    out[i] += p["out"]["bias"]
  return out


def np_ffn(x, p):
  return np_dense(np_gelu(np_dense(x, p["dense_0"])), p["dense_1"])


def np_post_ln_block(x, context, p, present=None):
  """BERT block: LN(x + Att(x, context)), then LN(x + FFN(x))."""
  x = np_layer_norm(x + np_attention(x, context, p["attention"], present),
                    p["norm_attention"])
  return np_layer_norm(x + np_ffn(x, p["mlp"]), p["norm_mlp"])


def np_pre_ln_cross_block(x, context, p, present):
  y = np_layer_norm(x, p["norm_attention"])
  c = np_layer_norm(context, p["norm_context"])
  x = x + np_attention(y, c, p["attention"], present)
  return x + np_ffn(np_layer_norm(x, p["norm_mlp"]), p["mlp"])


def to_numpy(tree):
  return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def np_coattention_ct(tokens, masks, p):
  """A "CT" ViLBERT stack: one Co-TRM layer, then one TRM layer per stream."""
  xa = np_dense(tokens["a"], p["proj_a"])
  xb = np_dense(tokens["b"], p["proj_b"])
  present_a = np.repeat(masks["a"][:, None], xa.shape[1], 1)
  present_b = np.repeat(masks["b"][:, None], xb.shape[1], 1)
  xa, xb = (np_post_ln_block(xa, xb, p["layer_0_co_a"], present_b),
            np_post_ln_block(xb, xa, p["layer_0_co_b"], present_a))
  xa = np_post_ln_block(xa, xa, p["layer_1_self_a"])
  xb = np_post_ln_block(xb, xb, p["layer_1_self_b"])
  return np.concatenate([xa.mean(1) * masks["a"][:, None],
                         xb.mean(1) * masks["b"][:, None]], -1)


def test_coattention_ct_matches_numpy():
  module = MODULES["coattention"]()
  assert module.layers == "CT" and module.pool == "mean"
  tokens = make_tokens("ab", seed=5)
  # Rows: both present, a missing, b missing, both missing.
  masks = make_masks("ab", {"a": [1, 0, 1, 0], "b": [1, 1, 0, 0]})
  params = contract.random_params(module, tokens, masks, seed=6)
  out = jitted(module, params)(tokens, masks)  # float32 on CPU
  expected = np_coattention_ct(to_numpy(tokens), to_numpy(masks),
                               to_numpy(params["params"]))
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
  assert np.all(out[3] == 0)
  assert np.all(out[1, :DIM] == 0) and np.all(out[1, DIM:] != 0)
  assert np.all(out[2, DIM:] == 0) and np.all(out[2, :DIM] != 0)


def test_coattention_first_token_pooling():
  # With no layers, pool="first" returns each stream's first projected token.
  module = CoAttentionFusion(**SMALL, layers="", pool="first")
  tokens, masks = make_tokens("ab", seed=3), make_masks("ab")
  params = contract.random_params(module, tokens, masks, seed=4)
  out = module.apply(params, tokens, masks)
  t, m, p = to_numpy(tokens), to_numpy(masks), to_numpy(params["params"])
  expected = np.concatenate(
      [np_dense(t[k][:, 0], p[f"proj_{k}"]) * m[k][:, None] for k in "ab"], -1)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_coattention_wiring_and_errors():
  tokens, masks = make_tokens("ab"), make_masks("ab")
  init = lambda module, t=tokens, m=masks: jax.eval_shape(
      module.init, jax.random.PRNGKey(0), t, m)["params"]
  params = init(CoAttentionFusion(layers="TCT"))
  assert sorted(k for k in params if k.startswith("layer_")) == [
      "layer_0_self_a", "layer_0_self_b", "layer_1_co_a", "layer_1_co_b",
      "layer_2_self_a", "layer_2_self_b"]
  with pytest.raises(ValueError, match="exactly two"):
    init(CoAttentionFusion(), make_tokens("abc"), make_masks("abc"))
  with pytest.raises(ValueError, match="'C' and 'T'"):
    init(CoAttentionFusion(layers="CX"))
  with pytest.raises(ValueError, match="pool"):
    init(CoAttentionFusion(pool="max"))


def test_cross_attention_layer_matches_numpy():
  module = MODULES["cross_attention"]()
  assert module.num_layers == 1 and module.query is None
  tokens = make_tokens("abc", seed=8)
  # Rows: all present; query a missing; context b missing (c attends alone);
  # all context missing (the query passes through the feed-forward only).
  masks = make_masks("abc", {"a": [1, 0, 1, 1], "b": [1, 1, 0, 0],
                             "c": [1, 1, 1, 0]})
  params = contract.random_params(module, tokens, masks, seed=9)
  out = jitted(module, params)(tokens, masks)  # float32 on CPU
  t, m, p = to_numpy(tokens), to_numpy(masks), to_numpy(params["params"])
  x = np_dense(t["a"], p["proj_a"])
  context = np.concatenate([np_dense(t["b"], p["proj_b"]),
                            np_dense(t["c"], p["proj_c"])], 1)
  present = np.concatenate([np.repeat(m["b"][:, None], 4, 1),
                            np.repeat(m["c"][:, None], 2, 1)], 1).astype(bool)
  x = np_layer_norm(np_pre_ln_cross_block(x, context, p["block_0"], present),
                    p["norm_out"])
  pooled_context = ((context * present[..., None]).sum(1) /
                    np.maximum(present.sum(1, keepdims=True), 1))
  expected = np.concatenate([x.mean(1) * m["a"][:, None], pooled_context], -1)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
  assert np.all(out[1, :DIM] == 0)
  assert np.all(out[3, DIM:] == 0) and np.all(out[3, :DIM] != 0)


def test_cross_attention_query_choice():
  tokens = make_tokens("abc")
  masks = make_masks("abc", {"a": [1, 1, 1, 1], "b": [1, 1, 1, 1],
                             "c": [1, 0, 1, 1]})
  module = CrossAttentionFusion(**SMALL, query="c")
  params = contract.random_params(module, tokens, masks)
  assert params["params"]["block_0"]["norm_context"]["scale"].shape == (DIM,)
  apply = jax.jit(module.apply)
  out = np.asarray(apply(params, tokens, masks))
  assert np.all(out[1, :DIM] == 0) and np.all(out[0, :DIM] != 0)
  # The query's tokens are not pooled into the context half.
  changed = dict(tokens, c=tokens["c"] + 1.0)
  np.testing.assert_array_equal(
      np.asarray(apply(params, changed, masks))[:, DIM:], out[:, DIM:])
  with pytest.raises(ValueError, match="query modality"):
    jax.eval_shape(CrossAttentionFusion(query="z").init,
                   jax.random.PRNGKey(0), tokens, masks)


def test_mult_blocks_and_positions():
  module, names = MODULES["mult"](), "abc"
  tokens = make_tokens(names)
  masks = make_masks(names, {"a": [1, 0, 1, 1], "b": [1, 1, 1, 1],
                             "c": [1, 1, 0, 1]})
  params = contract.random_params(module, tokens, masks)
  apply = jitted(module, params)
  assert {k for k in params["params"] if k.startswith("cross_")} == {
      f"cross_{s}_to_{t}_{suffix}" for t in names for s in names if s != t
      for suffix in ("0", "norm")}
  out = apply(tokens, masks)
  blocks = out.reshape(BATCH, 3, 2 * DIM)  # targets a, b, c
  assert np.all(blocks[1, 0] == 0) and np.all(blocks[2, 2] == 0)
  assert np.all(blocks[1, 1:] != 0) and np.all(blocks[2, :2] != 0)
  # Position embeddings make the output depend on the order of the tokens
  # (without them, attention and mean pooling are permutation invariant).
  reversed_b = dict(tokens, b=tokens["b"][:, ::-1])
  assert not np.allclose(apply(reversed_b, masks), out, atol=1e-4)
  positions = sinusoidal_positions(5, 6)
  np.testing.assert_allclose(positions[0], [0, 0, 0, 1, 1, 1])
  np.testing.assert_allclose(positions[3, 0], math.sin(3), rtol=1e-6)
  np.testing.assert_allclose(positions[3, 4], math.cos(3 / 10000**(1 / 3)),
                             rtol=1e-6)


def test_mult_stages_start_from_scaled_inputs_with_positions(monkeypatch):
  """As the reference's TransformerEncoder: every stage (crossmodal and
  self-attention) reads sqrt(width) * x + PE, and its feed-forward is 4x the
  stage's width."""
  seen = []
  original = attention.mult_input

  def recorded(x):
    seen.append(x.shape)
    return original(x)

  monkeypatch.setattr(attention, "mult_input", recorded)
  names = "ab"
  module = MulTFusion(dim=DIM, num_heads=2, num_layers=1, self_layers=1)
  tokens = make_tokens(names)
  masks = make_masks(names, {"a": [1, 1, 1, 1], "b": [1, 1, 1, 1]})
  params = module.init(jax.random.PRNGKey(0), tokens, masks)["params"]
  # Two projections (width DIM) and two self stages (width (M - 1) * DIM).
  assert sorted(shape[-1] for shape in seen) == [DIM] * 4
  x = np.asarray(tokens["b"])
  n, width = x.shape[1:]
  np.testing.assert_allclose(
      original(tokens["b"]),
      math.sqrt(width) * x + np.asarray(sinusoidal_positions(n, width)),
      rtol=1e-6, atol=1e-6)
  assert params["cross_a_to_b_0"]["mlp"]["dense_0"]["kernel"].shape == (
      DIM, 4 * DIM)
  assert params["self_b_0"]["mlp"]["dense_0"]["kernel"].shape == (DIM,
                                                                  4 * DIM)
  three = MulTFusion(dim=DIM, num_heads=2)
  tokens3 = make_tokens("abc")
  masks3 = make_masks("abc", {m: [1, 1, 1, 1] for m in "abc"})
  shapes = jax.eval_shape(three.init, jax.random.PRNGKey(0), tokens3,
                          masks3)["params"]
  assert shapes["self_a_0"]["mlp"]["dense_0"]["kernel"].shape == (
      2 * DIM, 8 * DIM)
