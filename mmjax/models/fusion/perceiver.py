"""Flamingo's Perceiver resampler and gated cross-attention, and a fusion.

Alayrac et al., "Flamingo: a Visual Language Model for Few-Shot Learning",
NeurIPS 2022, Appendix A.1.1 (Perceiver resampler, Figure 5) and A.1.2
(gated xattn-dense, Figure 4).

Each module computes in `dtype` (LayerNorm statistics and attention softmax
in float32) and stores its parameters in `param_dtype`. `remat` (a
`mmjax.models.layers.REMAT_POLICIES` name) rematerialises each attention and
feed-forward of the resampler under that policy, with the same parameters;
`remat(GatedCrossAttentionDense, policy)` is the gated block's.
"""

import flax.linen as nn
import jax.numpy as jnp
from einops import rearrange

from mmjax.models.layers import (NO_REMAT, FeedForward, attention, key_mask,
                                 pool_tokens, remat, zero_masked)
from mmjax.models.precision import Dtype

_EPSILON = 1e-6


def _norm(name: str, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=_EPSILON, name=name, dtype=dtype,
                      param_dtype=param_dtype)


class PerceiverResampler(nn.Module):
  """Flamingo's Perceiver resampler: [B, T, S, D] -> [B, num_latents, D].

  Figure 5 of Alayrac et al. (NeurIPS 2022): a learned time embedding
  [max_frames, 1, D] is added to each of the T frames of S tokens, the frames
  are flattened to [B, T*S, D], and `num_latents` learned latents [L, D]
  (shared over the batch) are refined by `num_layers` layers of

    latents = latents + Attention(q=LN_l(latents),
                                  kv=concat(LN_x(x), LN_l(latents)))
    latents = latents + FFW(latents)
    FFW = Dense(D) o GELU o Dense(mlp_dim) o LayerNorm

  then a final LayerNorm. The paper's pseudo-code (its Figure 5) shows the
  attention over concat(x, latents) without naming its normalisation; the
  separate LayerNorms for media (LN_x) and latents (LN_l) follow the
  reference implementations (lucidrains/flamingo-pytorch `PerceiverAttention`,
  mlfoundations/open_flamingo `PerceiverAttention`: `norm_media`,
  `norm_latents`). The output has a fixed number of tokens whatever T and S
  are.

  Attributes:
    num_latents: L, the number of learned latent queries (output tokens).
    num_layers: attention + feed-forward layers.
    num_heads: attention heads (D must be divisible by it).
    mlp_dim: hidden width of the feed-forward; None means 4 * D.
    max_frames: size of the time-embedding table; T must not exceed it.
    dropout: dropout rate of attention weights and feed-forward (train only).
    dtype, param_dtype: compute and parameter dtypes (module docstring).
    remat: a `mmjax.models.layers.REMAT_POLICIES` name (module docstring).
  """
  num_latents: int = 8
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int | None = None
  max_frames: int = 16
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = NO_REMAT

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None, *,
               train: bool = False) -> jnp.ndarray:
    """Resamples media tokens to latents.

    Args:
      x: media tokens [B, T, S, D] (T frames of S tokens each).
      mask: optional boolean key mask [B, T*S], False for media tokens the
        latents must not attend to. The latents' own keys are never masked,
        so an all-False row leaves the latents attending only to themselves.
      train: enables dropout.

    Returns:
      [B, num_latents, D] in `dtype`.
    """
    batch, frames, tokens, dim = x.shape
    if frames > self.max_frames:
      raise ValueError(f"{frames} frames exceed max_frames={self.max_frames}")
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    time = self.param("time_embedding", nn.initializers.normal(0.02),
                      (self.max_frames, 1, dim), self.param_dtype)
    x = rearrange(x + time[:frames].astype(self.dtype), "b t s d -> b (t s) d")
    latents = self.param("latents", nn.initializers.normal(0.02),
                         (self.num_latents, dim), self.param_dtype)
    latents = jnp.broadcast_to(latents.astype(self.dtype),
                               (batch, self.num_latents, dim))
    if mask is None:
      mask = jnp.ones((batch, frames * tokens), bool)
    present = jnp.concatenate(
        [mask.astype(bool), jnp.ones((batch, self.num_latents), bool)], 1)
    attention_mask = key_mask(present, self.num_latents, present.shape[1])
    mlp_dim = self.mlp_dim or 4 * dim
    feed_forward = remat(FeedForward, self.remat)
    for i in range(self.num_layers):
      media = _norm(f"norm_media_{i}", **precision)(x)
      queries = _norm(f"norm_latents_{i}", **precision)(latents)
      kv = jnp.concatenate([media, queries], 1)
      latents = latents + attention(
          self.num_heads, dropout_rate=self.dropout, deterministic=not train,
          remat_policy=self.remat, name=f"attention_{i}", **precision)(
              queries, kv, mask=attention_mask)
      ffw = feed_forward(mlp_dim, self.dropout, name=f"mlp_{i}", **precision)
      latents = latents + ffw(_norm(f"norm_mlp_{i}", **precision)(latents),
                              train=train)
    return _norm("norm_out", **precision)(latents)


class GatedCrossAttentionDense(nn.Module):
  """Flamingo's gated xattn-dense block: [B, N, D] -> [B, N, D].

  Figure 4 of Alayrac et al. (NeurIPS 2022), with pre-LayerNorm:

    y = y + tanh(alpha_xattn) * Attention(q=LN(y), kv=x)
    y = y + tanh(alpha_dense) * FFW(LN(y))

  alpha_xattn and alpha_dense are learned scalars initialised to 0, so the
  block is exactly the identity at initialisation (the frozen language model
  is unchanged until the gates open).

  Attributes:
    num_heads: attention heads.
    mlp_dim: hidden width of the feed-forward; None means 4 * D.
    dropout: dropout rate of attention weights and feed-forward (train only).
    dtype, param_dtype: compute and parameter dtypes (module docstring).
  """
  num_heads: int = 4
  mlp_dim: int | None = None
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: jnp.ndarray, x: jnp.ndarray,
               mask: jnp.ndarray | None = None,
               train: bool = False) -> jnp.ndarray:
    """Lets the query tokens y attend to the visual tokens x.

    Args:
      y: language (query) tokens [B, N, D].
      x: visual tokens [B, M, D] (e.g. resampler latents).
      mask: optional boolean mask, [B, M] (keys every query may see) or
        [B, N, M] (per query, e.g. Flamingo's "only the preceding image").
        A query that may see no key gets a zero attention output.
      train: enables dropout.

    Returns:
      [B, N, D] in `dtype`.
    """
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = lambda name: jnp.tanh(self.param(
        name, nn.initializers.zeros, (), self.param_dtype).astype(self.dtype))
    alpha_xattn, alpha_dense = gate("alpha_xattn"), gate("alpha_dense")
    y = y.astype(self.dtype)
    attend = attention(self.num_heads, dropout_rate=self.dropout,
                       deterministic=not train, name="attention", **precision)
    if mask is None:
      attended = attend(_norm("norm_attention", **precision)(y), x)
    else:
      if mask.ndim == 2:
        mask = jnp.broadcast_to(mask[:, None, :],
                                (y.shape[0], y.shape[1], x.shape[1]))
      mask = mask.astype(bool)
      attended = attend(_norm("norm_attention", **precision)(y), x,
                        mask=mask[:, None])
      attended = jnp.where(jnp.any(mask, -1, keepdims=True), attended, 0)
    y = y + alpha_xattn * attended
    ffw = FeedForward(self.mlp_dim or 4 * y.shape[-1], self.dropout,
                      name="mlp", **precision)
    return y + alpha_dense * ffw(_norm("norm_mlp", **precision)(y),
                                 train=train)


class PerceiverFusion(nn.Module):
  """Perceiver-resampler fusion: token dicts -> [B, dim].

  Each modality's tokens [B, N_m, D_m] are projected to `dim` by their own
  Dense layer and treated as one "frame" of the `PerceiverResampler`, so the
  resampler's time embedding acts as a learned modality embedding (modalities
  in sorted name order). Modalities with fewer tokens than the longest are
  padded with masked tokens to a common length, giving the resampler input
  [B, M, max_m N_m, dim]. The key mask is each modality's mask [B] broadcast
  over its tokens (padding is always masked); a masked modality's tokens are
  also zeroed before projection, so it cannot change the output. The
  `num_latents` output latents are mean-pooled to [B, dim]. If every modality
  is missing the latents attend only to themselves (finite output).

  Attributes:
    dim: model width.
    num_latents: learned latent queries of the resampler.
    num_layers: resampler layers.
    num_heads: attention heads.
    mlp_dim: feed-forward width; None means 4 * dim.
    dropout: dropout rate (train only).
    dtype, param_dtype, remat: as `PerceiverResampler`'s (module docstring).
  """
  dim: int = 64
  num_latents: int = 8
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int | None = None
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = NO_REMAT

  @nn.compact
  def __call__(self, tokens, masks, *, train: bool = False):
    names = sorted(tokens)
    length = max(tokens[m].shape[1] for m in names)
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    frames, present = [], []
    for m in names:
      x = nn.Dense(self.dim, name=f"proj_{m}", **precision)(
          zero_masked(tokens[m], masks[m]))
      pad = length - x.shape[1]
      frames.append(jnp.pad(x, ((0, 0), (0, pad), (0, 0))))
      keep = jnp.broadcast_to(masks[m][:, None], (x.shape[0], x.shape[1]))
      present.append(jnp.pad(keep, ((0, 0), (0, pad))))
    latents = PerceiverResampler(
        num_latents=self.num_latents, num_layers=self.num_layers,
        num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        max_frames=len(names), dropout=self.dropout, remat=self.remat,
        name="resampler", **precision)(
            jnp.stack(frames, 1), jnp.concatenate(present, 1), train=train)
    return pool_tokens(latents)
