"""A causal text decoder with a KV cache: token ids -> next-token logits.

One decoder serves every generative model (`mmjax.models.generative`) and
text-only language modelling:

  sequence = [prefix embeddings P] [tokens T]        (embedded, positioned)
  attention: causal, except that the first `full_attention_length` positions
             (a prefix LM's prefix: media tokens, prompt) see each other
  logits   = LN(x) @ E^T over the T token positions  (tied embeddings E,
             or a separate head)

Pre-LayerNorm blocks (GPT-2; Radford et al., "Language Models are
Unsupervised Multitask Learners", 2019) with learned absolute positions or
rotary ones (Su et al., "RoFormer: Enhanced Transformer with Rotary Position
Embedding", 2021, applied to each head's query and key, the half-split
rotation of GPT-NeoX and Llama). With `cross_attention=True` each block
also cross-attends to context tokens (Vaswani et al. 2017's decoder; the
multimodal decoder of CoCa). Llama's variations (Touvron et al., "LLaMA:
Open and Efficient Foundation Language Models", 2023) are options: RMSNorm,
a SwiGLU feed-forward, no biases, grouped-query attention, an untied head
and rotary frequencies of another base (`mmjax.models.causal_lm` loads
GPT-2 and Llama checkpoints). Flamingo's gated blocks are passed in by the
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
import numpy as np

from mmjax.models.layers import (EMBED, HEADS, KV, NO_REMAT, FeedForward,
                                 attention, fp32_softmax_attention, key_mask,
                                 partitioned, remat, zero_masked)
from mmjax.models.precision import Dtype

POSITIONS = ("learned", "rotary")
NORMS = ("layer", "rms")


def rotary_frequencies(head_dim: int, base: float = 10000.0,
                       llama3: tuple[float, float, float, int] | None = None
                       ) -> np.ndarray:
  """The rotary angle per position of each dimension pair: [Dh / 2] float32,
  base^(-2i/Dh) (Su et al. 2021).

  `llama3` = (factor, low_freq_factor, high_freq_factor,
  original_max_position_embeddings) rescales them as Llama 3.1 does for its
  longer context (Grattafiori et al., "The Llama 3 Herd of Models", 2024):
  wavelengths 2 pi / f longer than original / low_freq_factor are divided by
  `factor`, those shorter than original / high_freq_factor kept, and the ones
  between interpolated with s = (original / wavelength - low) / (high - low):
  f ((1 - s) / factor + s).
  """
  freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32)
                         / np.float32(head_dim)))
  if llama3 is None:
    return freq.astype(np.float32)
  factor, low, high, original = llama3
  wavelength = 2 * np.pi / freq
  scaled = np.where(wavelength > original / low, freq / factor, freq)
  smooth = (original / wavelength - low) / (high - low)
  between = (wavelength >= original / high) & (wavelength <= original / low)
  return np.where(between, (1 - smooth) * scaled / factor + smooth * scaled,
                  scaled).astype(np.float32)


def rotary(x: jnp.ndarray, positions: jnp.ndarray,
           frequencies: np.ndarray | None = None) -> jnp.ndarray:
  """Rotary position embedding of x [B, T, H, Dh] at positions [T] (int).

  Dimension pairs (i, i + Dh/2) are rotated by the angle
  position * frequencies[i], by default base^(-2i/Dh) with base 10000
  (`rotary_frequencies`; the half-split layout of GPT-NeoX and Llama).
  Computed in float32, returned in x's dtype.
  """
  if frequencies is None:
    frequencies = rotary_frequencies(x.shape[-1])
  angle = positions.astype(jnp.float32)[:, None] * frequencies  # [T, Dh/2]
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
  float32 softmax. With grouped-query attention (Ainslie et al., "GQA",
  2023) "key" and "value" have G = num_kv_heads heads ([D, G, Dh]), each
  shared by H / G consecutive query heads, and the cache keeps G heads.

  Attributes:
    num_heads: H.
    max_length: cache length (decode only): prefix plus tokens.
    positions: "learned" (added to the inputs by the decoder) or "rotary"
      (applied here to queries and keys).
    dropout: attention-weight dropout (train only).
    num_kv_heads: G (H must be divisible by it); None: H.
    head_dim: Dh; None: D / H.
    use_bias: biases of the four projections.
    rotary_base, rotary_llama3: `rotary_frequencies`' base and llama3.
  """
  num_heads: int
  max_length: int
  positions: str = "learned"
  dropout: float = 0.0
  num_kv_heads: int | None = None
  head_dim: int | None = None
  use_bias: bool = True
  rotary_base: float = 10000.0
  rotary_llama3: tuple[float, float, float, int] | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, valid, *, full_attention_length: int = 0,
               decode: bool = False, train: bool = False):
    """x [B, T, D], positions [T] int (absolute), valid [B, T] bool (False
    keys are never attended to) -> [B, T, D]."""
    batch, length, width = x.shape
    head_dim = self.head_dim or width // self.num_heads
    kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={kv_heads}")
    dense = functools.partial(nn.DenseGeneral, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              use_bias=self.use_bias)
    kernel, bias = nn.initializers.lecun_normal(), nn.initializers.zeros_init()
    q, k, v = (dense((heads, head_dim), name=n,
                     kernel_init=partitioned(kernel, EMBED, HEADS, KV),
                     bias_init=partitioned(bias, HEADS, KV))(x)
               for n, heads in (("query", self.num_heads), ("key", kv_heads),
                                ("value", kv_heads)))
    if self.positions == "rotary":
      frequencies = rotary_frequencies(head_dim, self.rotary_base,
                                       self.rotary_llama3)
      q, k = rotary(q, positions, frequencies), rotary(k, positions,
                                                       frequencies)
    key_positions = positions
    if decode:
      shape = (batch, self.max_length, kv_heads, head_dim)
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
    if kv_heads != self.num_heads:  # each key head serves H / G query heads
      k, v = (jnp.repeat(t, self.num_heads // kv_heads, axis=2) for t in (k, v))
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


def norm_layer(kind: str, epsilon: float, name: str, **precision) -> nn.Module:
  """The decoder's normalisation: "layer" (LayerNorm, scale and bias; GPT-2)
  or "rms" (RMSNorm, scale only; Zhang and Sennrich 2019, Llama)."""
  if kind not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
  cls = nn.LayerNorm if kind == "layer" else nn.RMSNorm
  return cls(epsilon, name=name, **precision)


class DecoderBlock(nn.Module):
  """Pre-LayerNorm decoder block: [B, T, D] -> [B, T, D].

    x = x + SelfAttention(LN(x))                       (causal, cached)
    x = x + CrossAttention(LN(x), LN(context))         (cross_attention)
    x = x + FFW(LN(x))

  LN is `norm` ("layer" or "rms"), FFW gated with `gated_mlp`.

  Attributes: as `TextDecoder`'s (num_heads, mlp_dim, max_length,
  positions, dropout, layer_norm_epsilon, cross_attention, dtypes, ...),
  and the call's `full_attention_length` and `decode` (fields, so that they
  stay static under rematerialisation).
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
  norm: str = "layer"
  gated_mlp: bool = False
  num_kv_heads: int | None = None
  head_dim: int | None = None
  attention_bias: bool = True
  mlp_bias: bool = True
  rotary_base: float = 10000.0
  rotary_llama3: tuple[float, float, float, int] | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, valid, context=None, context_valid=None,
               train: bool = False):
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: norm_layer(self.norm, self.layer_norm_epsilon, name,
                                   **precision)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    x = x + drop(CausalSelfAttention(
        self.num_heads, self.max_length, self.positions, self.dropout,
        self.num_kv_heads, self.head_dim, self.attention_bias,
        self.rotary_base, self.rotary_llama3, name="attention", **precision)(
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
                      activation=self.activation, gated=self.gated_mlp,
                      use_bias=self.mlp_bias, **precision)
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
    norm: "layer" (LayerNorm) or "rms" (RMSNorm, Llama).
    gated_mlp: a gated feed-forward (`FeedForward(gated=True)`; SwiGLU with
      activation "silu").
    num_kv_heads: key/value heads of grouped-query attention; None: num_heads.
    head_dim: per-head width; None: width / num_heads.
    attention_bias, mlp_bias: biases of the attention projections and of
      the feed-forward (GPT-2: both; Llama: neither).
    rotary_base, rotary_llama3: the rotary frequencies' base (Llama's
      rope_theta) and Llama 3.1's rescaling (`rotary_frequencies`).
    tie_embeddings: the output head is the token embedding (`embed.attend`);
      False: a separate "lm_head" [D, V] without bias (Llama).
    remat: a `mmjax.models.layers.REMAT_POLICIES` name for the blocks.
    dtype, param_dtype: compute and parameter dtypes; the logits are float32.

  The defaults are GPT-2's architecture.
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
  norm: str = "layer"
  gated_mlp: bool = False
  num_kv_heads: int | None = None
  head_dim: int | None = None
  attention_bias: bool = True
  mlp_bias: bool = True
  rotary_base: float = 10000.0
  rotary_llama3: tuple[float, float, float, int] | None = None
  tie_embeddings: bool = True
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
    llama3 = None if self.rotary_llama3 is None else tuple(self.rotary_llama3)
    for i in range(self.num_layers):
      if i in gated_blocks:
        x = gated_blocks[i](x, gated_context, gated_valid, train=train)
      x = block(self.num_heads, self.mlp_dim, self.max_length, self.positions,
                self.dropout, self.layer_norm_epsilon, self.cross_attention,
                full_attention_length, decode, self.activation, self.norm,
                self.gated_mlp, self.num_kv_heads, self.head_dim,
                self.attention_bias, self.mlp_bias, self.rotary_base,
                llama3, name=f"layer_{i}", **precision)(
                    x, positions, valid, context, context_valid, train)
    x = norm_layer(self.norm, self.layer_norm_epsilon, "norm_out",
                   **precision)(x)
    if prefix is not None:
      x = x[:, prefix.shape[1]:]
    if self.tie_embeddings:
      return embed.attend(x).astype(jnp.float32)
    head = nn.Dense(self.vocab_size, use_bias=False, name="lm_head",
                    kernel_init=partitioned(nn.initializers.normal(0.02),
                                            EMBED, None), **precision)
    return head(x).astype(jnp.float32)
