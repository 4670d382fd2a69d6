"""A causal text decoder with a KV cache: token ids -> next-token logits.

One decoder serves every generative model (`mmjax.models.generative`) and
text-only language modelling:

  sequence = [prefix embeddings P] [tokens T]        (embedded, positioned)
  attention: causal, except that the first `full_attention_length` positions
             (a prefix LM's prefix: media tokens, prompt) see each other
  logits   = LN(x) @ E^T over the T token positions  (tied embeddings E)

Pre-LayerNorm blocks (GPT-2; Radford et al., "Language Models are
Unsupervised Multitask Learners", 2019) with learned absolute positions or
rotary ones (Su et al., "RoFormer: Enhanced Transformer with Rotary Position
Embedding", 2021, applied to each head's query and key, the half-split
rotation of GPT-NeoX and Llama). With `cross_attention=True` each block
also cross-attends to context tokens (Vaswani et al. 2017's decoder; the
multimodal decoder of CoCa). Flamingo's gated blocks are passed in by the
model that owns them (`gated_blocks`), so a frozen language model keeps
exactly the parameter tree it was trained with.

KV cache (`decode=True`, collection "cache"): each attention keeps its keys
and values [B, max_length, H, Dh], the validity of each cached position
[B, max_length] and the write index (a scalar shared by the batch). A call
writes its T positions at the index and attends over everything cached so
far, so a prefill of the whole prompt followed by one token per call gives
the logits of the full recomputation (tested). The cache is created by the
first `decode=True` call of `apply(..., mutable=["cache"])`.
"""

import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import (EMBED, HEADS, KV, NO_REMAT, FeedForward,
                                 attention, fp32_softmax_attention, key_mask,
                                 partitioned, remat, zero_masked)
from mmjax.models.precision import Dtype

POSITIONS = ("learned", "rotary")


def rotary(x: jnp.ndarray, positions: jnp.ndarray,
           base: float = 10000.0) -> jnp.ndarray:
  """Rotary position embedding of x [B, T, H, Dh] at positions [T] (int).

  Dimension pairs (i, i + Dh/2) are rotated by the angle
  position * base^(-2i/Dh) (Su et al. 2021; the half-split layout of
  GPT-NeoX and Llama). Computed in float32, returned in x's dtype.
  """
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1])
  angle = positions.astype(jnp.float32)[:, None] * freq  # [T, half]
  cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                         -1).astype(x.dtype)


def attention_mask(query_positions, key_positions, key_valid,
                   full_attention_length: int) -> jnp.ndarray:
  """[B, 1, Q, K] bool: key k is visible to query q if it is valid and
  k <= q (causal) or both lie in the first `full_attention_length`
  positions (a prefix LM's bidirectional prefix).

  query_positions [Q], key_positions [K] (int), key_valid [B, K] bool.
  """
  q, k = query_positions[:, None], key_positions[None, :]
  allowed = (k <= q) | ((k < full_attention_length)
                        & (q < full_attention_length))
  return key_valid[:, None, None, :] & allowed[None, None]


class CausalSelfAttention(nn.Module):
  """Multi-head self-attention with a causal mask and a KV cache.

  x [B, T, D] at `positions` [T] -> [B, T, D]. Projections "query", "key",
  "value" ([D, H, Dh]) and "out" ([H, Dh, D]), as flax's
  MultiHeadDotProductAttention names them, with its logical axis names
  (`mmjax.models.layers.attention`: the heads split by tensor parallelism);
  float32 softmax.

  Attributes:
    num_heads: H (D must be divisible by it).
    max_length: cache length (decode only): prefix plus tokens.
    positions: "learned" (added to the inputs by the decoder) or "rotary"
      (applied here to queries and keys).
    dropout: attention-weight dropout (train only).
  """
  num_heads: int
  max_length: int
  positions: str = "learned"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, valid, *, full_attention_length: int = 0,
               decode: bool = False, train: bool = False):
    """x [B, T, D], positions [T] int (absolute), valid [B, T] bool (False
    keys are never attended to) -> [B, T, D]."""
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    dense = functools.partial(nn.DenseGeneral, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    kernel, bias = nn.initializers.lecun_normal(), nn.initializers.zeros_init()
    q, k, v = (dense((self.num_heads, head_dim), name=n,
                     kernel_init=partitioned(kernel, EMBED, HEADS, KV),
                     bias_init=partitioned(bias, HEADS, KV))(x)
               for n in ("query", "key", "value"))
    if self.positions == "rotary":
      q, k = rotary(q, positions), rotary(k, positions)
    key_positions = positions
    if decode:
      shape = (batch, self.max_length, self.num_heads, head_dim)
      cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
      cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
      cached_valid = self.variable("cache", "cached_valid", jnp.zeros,
                                   (batch, self.max_length), bool)
      index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
      start = index.value
      update = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(
          cache, new.astype(cache.dtype), start, axis=1)
      cached_k.value = update(cached_k.value, k)
      cached_v.value = update(cached_v.value, v)
      cached_valid.value = update(cached_valid.value, valid)
      index.value = start + length
      k, v, valid = cached_k.value, cached_v.value, cached_valid.value
      key_positions = jnp.arange(self.max_length)
    mask = attention_mask(positions, key_positions, valid,
                          full_attention_length)
    dropout_rng = (self.make_rng("dropout")
                   if train and self.dropout > 0 else None)
    y = fp32_softmax_attention(q, k, v, mask=mask, dropout_rng=dropout_rng,
                               dropout_rate=self.dropout,
                               deterministic=not train, dtype=self.dtype)
    return dense(width, axis=(-2, -1), name="out",
                 kernel_init=partitioned(kernel, HEADS, KV, EMBED),
                 bias_init=partitioned(bias, EMBED))(y)


class DecoderBlock(nn.Module):
  """Pre-LayerNorm decoder block: [B, T, D] -> [B, T, D].

    x = x + SelfAttention(LN(x))                       (causal, cached)
    x = x + CrossAttention(LN(x), LN(context))         (cross_attention)
    x = x + FFW(LN(x))

  Attributes: as `TextDecoder`'s (num_heads, mlp_dim, max_length,
  positions, dropout, layer_norm_epsilon, cross_attention, dtypes), and
  the call's `full_attention_length` and `decode` (fields, so that they stay
  static under rematerialisation).
  """
  num_heads: int
  mlp_dim: int
  max_length: int
  positions: str = "learned"
  dropout: float = 0.0
  layer_norm_epsilon: float = 1e-5
  cross_attention: bool = False
  full_attention_length: int = 0
  decode: bool = False
  activation: str = "gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, valid, context=None, context_valid=None,
               train: bool = False):
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.LayerNorm(self.layer_norm_epsilon, name=name,
                                     **precision)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    x = x + drop(CausalSelfAttention(
        self.num_heads, self.max_length, self.positions, self.dropout,
        name="attention", **precision)(
            norm("norm_attention")(x), positions, valid,
            full_attention_length=self.full_attention_length,
            decode=self.decode, train=train))
    if self.cross_attention:
      if context is None:
        raise ValueError("a cross-attention decoder block needs `context`")
      attend = attention(self.num_heads, dropout_rate=self.dropout,
                         deterministic=not train, name="cross_attention",
                         **precision)
      mask = key_mask(context_valid, x.shape[1], context.shape[1])
      update = attend(norm("norm_cross")(x), norm("norm_context")(context),
                      mask=mask)
      x = x + drop(zero_masked(update, jnp.any(context_valid, -1)))
    ffn = FeedForward(self.mlp_dim, self.dropout, name="mlp",
                      activation=self.activation, **precision)
    return x + drop(ffn(norm("norm_mlp")(x), train=train))


class TextDecoder(nn.Module):
  """The causal decoder (module docstring): ids [B, T] -> logits [B, T, V].

  Attributes:
    vocab_size: V.
    width: model width D.
    num_layers: decoder blocks, named "layer_<i>".
    num_heads: attention heads.
    mlp_dim: feed-forward hidden width (GPT-2: 4 D).
    max_length: the longest sequence, prefix plus tokens (position table and
      KV cache length).
    positions: "learned" (table "position_embeddings" [max_length, D]) or
      "rotary".
    dropout: dropout of embeddings, attention weights and residual branches.
    layer_norm_epsilon: 1e-5 (GPT-2).
    cross_attention: every block cross-attends to `context`.
    activation: the feed-forward's, a `mmjax.models.layers.ACTIVATIONS`
      name ("gelu_tanh" for GPT-2's "gelu_new").
    remat: a `mmjax.models.layers.REMAT_POLICIES` name for the blocks.
    dtype, param_dtype: compute and parameter dtypes; the logits are float32.
  """
  vocab_size: int
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  max_length: int = 128
  positions: str = "learned"
  dropout: float = 0.0
  layer_norm_epsilon: float = 1e-5
  cross_attention: bool = False
  activation: str = "gelu"
  remat: str = NO_REMAT
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, *,
               token_valid: jnp.ndarray | None = None,
               prefix: jnp.ndarray | None = None,
               prefix_valid: jnp.ndarray | None = None,
               full_attention_length: int = 0,
               context: jnp.ndarray | None = None,
               context_valid: jnp.ndarray | None = None,
               gated_blocks: Mapping[int, nn.Module] | None = None,
               gated_context: jnp.ndarray | None = None,
               gated_valid: jnp.ndarray | None = None,
               decode: bool = False, train: bool = False) -> jnp.ndarray:
    """Next-token logits.

    Args:
      tokens: int [B, T] token ids.
      token_valid: bool [B, T]; False positions are never attended to
        (padding inside a prompt). Default all True.
      prefix: [B, P, D] embeddings placed before the tokens (a prefix LM's
        media tokens), or None.
      prefix_valid: bool [B, P] (e.g. False for a missing modality).
      full_attention_length: the first positions of the whole sequence
        that attend bidirectionally among themselves (prefix and prompt).
      context, context_valid: [B, K, D] and bool [B, K] for the
        cross-attention blocks.
      gated_blocks: {i: module} applied as `module(x, gated_context,
        gated_valid, train=...)` before block i (Flamingo's gated
        xattn-dense, owned by the caller).
      decode: use and extend the KV cache (module docstring); positions
        continue from the cache's index.
      train: dropout.

    Returns:
      float32 [B, T, V] logits of the token positions (not the prefix's).
    """
    if self.positions not in POSITIONS:
      raise ValueError(f"positions must be one of {POSITIONS}, got "
                       f"{self.positions!r}")
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embed = nn.Embed(self.vocab_size, self.width,
                     embedding_init=nn.initializers.normal(0.02),
                     name="token_embeddings", **precision)
    x = embed(tokens)
    valid = (jnp.ones(tokens.shape, bool) if token_valid is None
             else token_valid.astype(bool))
    if prefix is not None:
      x = jnp.concatenate([prefix.astype(x.dtype), x], 1)
      prefix_valid = (jnp.ones(prefix.shape[:2], bool)
                      if prefix_valid is None else prefix_valid.astype(bool))
      valid = jnp.concatenate([prefix_valid, valid], 1)
    length = x.shape[1]
    start = 0
    if decode:  # positions continue where the cache stopped
      index = self.variable("cache", "position", lambda: jnp.zeros(
          (), jnp.int32))
      start = index.value
      index.value = start + length
    elif length > self.max_length:
      raise ValueError(f"the decoder's sequence of {length} positions "
                       f"(prefix and tokens) exceeds its max_length="
                       f"{self.max_length}")
    positions = start + jnp.arange(length)
    if self.positions == "learned":
      table = self.param("position_embeddings", nn.initializers.normal(0.01),
                         (self.max_length, self.width), self.param_dtype)
      x = x + jnp.take(table, positions, axis=0).astype(x.dtype)[None]
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    # The cache is written in place: no rematerialisation while decoding
    # (nothing is differentiated there; the parameters are the same).
    block = DecoderBlock if decode else remat(DecoderBlock, self.remat)
    gated_blocks = gated_blocks or {}
    for i in range(self.num_layers):
      if i in gated_blocks:
        x = gated_blocks[i](x, gated_context, gated_valid, train=train)
      x = block(self.num_heads, self.mlp_dim, self.max_length, self.positions,
                self.dropout, self.layer_norm_epsilon, self.cross_attention,
                full_attention_length, decode, self.activation,
                name=f"layer_{i}", **precision)(x, positions, valid, context, context_valid,
                             train)
    x = nn.LayerNorm(self.layer_norm_epsilon, name="norm_out", **precision)(x)
    if prefix is not None:
      x = x[:, prefix.shape[1]:]
    return embed.attend(x).astype(jnp.float32)
