"""Attention fusions over token sequences: cross-attention, co-attention, MulT.

Each fusion takes per-modality tokens and boolean masks,

  fusion(tokens: dict[str, [B, N_m, D_m]], masks: dict[str, [B]], train=...)

and returns a fused representation [B, D]. A masked modality contributes
nothing: its keys are masked out of every attention that reads it, an
attention whose keys are all masked has its output (the residual update)
zeroed, and a masked modality's own pooled block of the output is zero.

Each computes in `dtype` (LayerNorm statistics and attention softmax in
float32) and stores its parameters in `param_dtype`; `remat` (a
`mmjax.models.layers.REMAT_POLICIES` name) rematerialises every transformer
block under that policy, with the same parameters.
"""

import functools
import math

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.layers import (NO_REMAT, TransformerBlock, masked_mean,
                                 pool_tokens, remat, zero_masked)
from mmjax.models.precision import Dtype


def sinusoidal_positions(length: int, dim: int) -> jnp.ndarray:
  """Sinusoidal position embeddings [length, dim] (Vaswani et al., 2017).

  The first ceil(dim / 2) features are sin(p / 10000^(2i/dim)), the rest the
  matching cosines (the tensor2tensor / fairseq layout used by MulT).
  """
  half = (dim + 1) // 2
  frequencies = jnp.exp(-math.log(10000.0) * 2 * jnp.arange(half) / dim)
  angles = jnp.arange(length)[:, None] * frequencies[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)[:, :dim]


def mult_input(x: jnp.ndarray) -> jnp.ndarray:
  """MulT's transformer input: sqrt(D) * x + PE, x [B, N, D] (the reference
  `TransformerEncoder.forward`: `embed_scale * x_in` plus the sinusoidal
  positions, for queries and keys alike)."""
  width = x.shape[-1]
  return (math.sqrt(width) * x +
          sinusoidal_positions(x.shape[1], width).astype(x.dtype))


def _check_modalities(tokens, masks, minimum: int, name: str):
  names = sorted(tokens)
  if len(names) < minimum:
    raise ValueError(f"{name} needs at least {minimum} modalities, got "
                     f"{names}")
  if sorted(masks) != names:
    raise ValueError(f"{name}: masks {sorted(masks)} do not match tokens "
                     f"{names}")
  return names


class CrossAttentionFusion(nn.Module):
  """One modality's tokens query the others': [B, 2 * dim].

  Every modality's tokens [B, N_m, D_m] are projected to `dim` by their own
  Dense layer. The query modality (`query`, default the first in sorted order)
  is updated by `num_layers` pre-LN cross-attention `TransformerBlock`s whose
  keys and values are the other modalities' projected tokens, concatenated
  along the token axis with a per-key mask (a missing modality's keys are
  masked). The output is concat(mean over the updated query tokens, mean over
  the present context tokens), after a final LayerNorm on the query stream.

  Masking: when every context modality is missing the attention updates are
  zero, so the query stream passes only through the feed-forward layers; when
  the query modality is missing its half of the output is zero; when all are
  missing the output is zero.
  """
  query: str | None = None
  dim: int = 64
  num_heads: int = 4
  num_layers: int = 1
  mlp_dim: int = 128
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = NO_REMAT

  @nn.compact
  def __call__(self, tokens, masks, *, train: bool = False):
    names = _check_modalities(tokens, masks, 2, "CrossAttentionFusion")
    query = names[0] if self.query is None else self.query
    if query not in names:
      raise ValueError(f"query modality {query!r} not among {names}")
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    project = lambda m: nn.Dense(self.dim, name=f"proj_{m}", **precision)(
        tokens[m])
    x = project(query)
    others = [m for m in names if m != query]
    context = jnp.concatenate([project(m) for m in others], 1)  # [B, K, dim]
    present = jnp.concatenate([
        jnp.broadcast_to(masks[m][:, None], tokens[m].shape[:2])
        for m in others], 1)  # [B, K]
    block = remat(TransformerBlock, self.remat)
    for i in range(self.num_layers):
      x = block(self.num_heads, self.mlp_dim, self.dropout,
                name=f"block_{i}", **precision)(x, context, present,
                                                train=train)
    x = nn.LayerNorm(epsilon=1e-6, name="norm_out", **precision)(x)
    pooled_query = zero_masked(pool_tokens(x), masks[query])
    pooled_context = masked_mean(context, present)
    return jnp.concatenate([pooled_query, pooled_context], -1)


class CoAttentionFusion(nn.Module):
  """ViLBERT two-stream co-attention: [B, 2 * dim].

  Lu, Batra, Parikh, Lee, "ViLBERT: Pretraining Task-Agnostic Visiolinguistic
  Representations for Vision-and-Language Tasks", NeurIPS 2019. Exactly two
  modalities, A and B in sorted name order; each one's tokens [B, N, D_m] are
  projected to `dim` by its own Dense layer. `layers` is the wiring, read left
  to right, one character per layer:

    "C": a co-attentional transformer layer (Co-TRM, the paper's Figure 2b).
         From the layer's inputs H_A, H_B, stream A's queries attend to B's
         keys and values and B's queries to A's (each direction with its own
         attention parameters); each stream then adds its input and applies
         LayerNorm, then its own feed-forward with residual and LayerNorm
         (BERT-style post-LN).
    "T": one transformer layer (TRM) on each stream: post-LN self-attention
         within the stream, with its own parameters per stream.

  e.g. "CT" (default) is one Co-TRM then one TRM per stream; "TCT" adds a TRM
  before it. Each stream is pooled by the mean over its tokens (`pool="mean"`)
  or its first token (`pool="first"`, ViLBERT's IMG and CLS tokens), and the
  output is concat(pooled A, pooled B).

  Masking: when B is missing, A's co-attention output from B is zero (A is
  not changed by B's content) and B's pooled block is zero; symmetric for A.
  """
  dim: int = 64
  num_heads: int = 4
  layers: str = "CT"
  mlp_dim: int = 128
  dropout: float = 0.0
  pool: str = "mean"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = NO_REMAT

  @nn.compact
  def __call__(self, tokens, masks, *, train: bool = False):
    if len(tokens) != 2:
      raise ValueError(f"CoAttentionFusion takes exactly two modalities, got "
                       f"{sorted(tokens)}")
    names = _check_modalities(tokens, masks, 2, "CoAttentionFusion")
    if set(self.layers) - set("CT"):
      raise ValueError(f"layers {self.layers!r} may hold only 'C' and 'T'")
    if self.pool not in ("mean", "first"):
      raise ValueError(f"pool must be 'mean' or 'first', got {self.pool!r}")
    a, b = names
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    xa = nn.Dense(self.dim, name=f"proj_{a}", **precision)(tokens[a])
    xb = nn.Dense(self.dim, name=f"proj_{b}", **precision)(tokens[b])
    block = functools.partial(remat(TransformerBlock, self.remat),
                              self.num_heads, self.mlp_dim, self.dropout,
                              post_norm=True, **precision)
    for i, kind in enumerate(self.layers):
      if kind == "C":  # Both directions read the layer's inputs.
        co_a = block(name=f"layer_{i}_co_{a}")
        co_b = block(name=f"layer_{i}_co_{b}")
        xa, xb = (co_a(xa, xb, masks[b], train=train),
                  co_b(xb, xa, masks[a], train=train))
      else:
        xa = block(name=f"layer_{i}_self_{a}")(xa, train=train)
        xb = block(name=f"layer_{i}_self_{b}")(xb, train=train)
    pool = pool_tokens if self.pool == "mean" else (lambda x: x[:, 0])
    return jnp.concatenate([zero_masked(pool(xa), masks[a]),
                            zero_masked(pool(xb), masks[b])], -1)


class MulTFusion(nn.Module):
  """Multimodal Transformer (MulT): [B, M * (M - 1) * dim].

  Tsai, Bai, Liang, Kolter, Morency, Salakhutdinov, "Multimodal Transformer
  for Unaligned Multimodal Language Sequences", ACL 2019; reference code
  yaohungt/Multimodal-Transformer (`MULTModel`, `TransformerEncoder`). Each
  modality's tokens [B, N_m, D_m] are projected to `dim` by a bias-free 1D
  temporal convolution of width `kernel_size` (1 in the authors' code, where
  it is a per-token Dense layer). Every transformer stage starts as the
  reference's does, from sqrt(width) * x plus sinusoidal position embeddings
  (`mult_input`). For every ordered pair (target m, source s != m) a
  crossmodal transformer CM_{s->m} of `num_layers` pre-LN cross-attention
  `TransformerBlock`s lets the target's tokens query the source's tokens
  (layer-normed, as in the paper), with a final LayerNorm. The M - 1 outputs
  for target m are concatenated along features ([B, N_m, (M - 1) * dim]) and
  passed through a self-attention transformer of `self_layers` pre-LN blocks
  (its input again sqrt((M - 1) * dim) * x + PE; plus a final LayerNorm),
  then pooled by the mean over tokens (the paper takes the last element; the
  mean does not depend on which end of the sequence holds the data). The
  output concatenates the targets in sorted order. The feed-forward of each
  stage is 4x its width, as the reference's `fc1`, unless `mlp_dim` is set.

  Kept from the rest of mmjax rather than the reference: GELU in the
  feed-forward (the reference uses ReLU), positions counted from 0 with the
  frequencies 10000^(-2i/D) (`sinusoidal_positions`; fairseq's counts from
  1), and the mean pooling above.

  Masking: a missing source's keys are masked and its crossmodal residual
  updates are zero, so it contributes nothing to its targets; a missing
  target's output block is zero.
  """
  dim: int = 64
  num_heads: int = 4
  num_layers: int = 1
  self_layers: int = 1
  mlp_dim: int | None = None  # None: 4 x the stage's width
  dropout: float = 0.0
  kernel_size: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = NO_REMAT

  @nn.compact
  def __call__(self, tokens, masks, *, train: bool = False):
    names = _check_modalities(tokens, masks, 2, "MulTFusion")
    drop = nn.Dropout(self.dropout, deterministic=not train)
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = remat(TransformerBlock, self.remat)
    embedded = {}
    for m in names:
      x = nn.Conv(self.dim, (self.kernel_size,), padding="SAME",
                  use_bias=False, name=f"proj_{m}", **precision)(tokens[m])
      embedded[m] = drop(mult_input(x))
    outputs = []
    for m in names:
      streams = []
      for s in names:
        if s == m:
          continue
        x = embedded[m]
        for i in range(self.num_layers):
          x = block(self.num_heads, self.mlp_dim or 4 * self.dim,
                    self.dropout, name=f"cross_{s}_to_{m}_{i}", **precision)(
                        x, embedded[s], masks[s], train=train)
        streams.append(nn.LayerNorm(epsilon=1e-6,
                                    name=f"cross_{s}_to_{m}_norm",
                                    **precision)(x))
      x = jnp.concatenate(streams, -1)  # [B, N_m, (M - 1) * dim]
      if self.self_layers:
        x = drop(mult_input(x))
      for i in range(self.self_layers):
        x = block(self.num_heads, self.mlp_dim or 4 * x.shape[-1],
                  self.dropout, name=f"self_{m}_{i}", **precision)(
                      x, train=train)
      x = nn.LayerNorm(epsilon=1e-6, name=f"self_{m}_norm", **precision)(x)
      outputs.append(zero_masked(pool_tokens(x), masks[m]))
    return jnp.concatenate(outputs, -1)
