"""Small layers shared by every model."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Dense layers with ReLU between them: [..., D_in] -> [..., features[-1]].

  Attributes:
    features: output width of each Dense layer; no activation after the last.
  """
  features: Sequence[int]

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i, width in enumerate(self.features):
      x = nn.Dense(width, name=f"dense_{i}")(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


def masked_mean(values: jnp.ndarray, present: jnp.ndarray) -> jnp.ndarray:
  """Mean over axis 1 of `values` [B, M, ...], counting only present entries.

  `present` is [B, M] (bool or float weights). Rows where nothing is present
  give zeros rather than NaN.
  """
  weights = present.astype(values.dtype)
  weights = weights.reshape(weights.shape + (1,) * (values.ndim - 2))
  total = jnp.sum(values * weights, axis=1)
  count = jnp.sum(weights, axis=1)
  return total / jnp.maximum(count, 1.0)


def zero_masked(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """x [B, ...] with rows whose mask [B] is False set to zero."""
  return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, 0)


def pool_tokens(tokens: jnp.ndarray) -> jnp.ndarray:
  """Mean over the token axis: [B, N, D] -> [B, D]."""
  return jnp.mean(tokens, axis=1)


def key_mask(present: jnp.ndarray, num_queries: int,
             num_keys: int) -> jnp.ndarray:
  """Attention mask [B, 1, Q, K] letting every query see keys where `present`.

  `present` is [B] (one flag per example for all K keys) or [B, K].
  """
  if present.ndim == 1:
    present = jnp.broadcast_to(present[:, None], (present.shape[0], num_keys))
  return jnp.broadcast_to(present[:, None, None, :],
                          (present.shape[0], 1, num_queries, num_keys))


class FeedForward(nn.Module):
  """The transformer MLP: Dense(mlp_dim) -> GELU -> dropout -> Dense(D)."""
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    width = x.shape[-1]
    x = nn.gelu(nn.Dense(self.mlp_dim, name="dense_0")(x), approximate=False)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(width, name="dense_1")(x)


class TransformerBlock(nn.Module):
  """Attention plus feed-forward with residuals: [B, N, D] -> [B, N, D].

  Self-attention by default, `mask` an attention mask [B, 1, N, N] (see
  `key_mask`). Cross-attention with `context` [B, K, D]: queries from `x`,
  keys and values from `context`, and `present` ([B] or [B, K], bool) says
  which keys exist. Masked keys get zero attention weight, and where an
  example has no key at all the attention output is zeroed, so `x` receives
  no residual update from the context (flax attention would otherwise attend
  uniformly to the masked keys).

  `post_norm=False` is the pre-LayerNorm block of ViT (x + f(LN(x)); with a
  context, x + f(LN(x), LN(context)), the context's own LayerNorm as in MulT);
  `post_norm=True` the post-LayerNorm block of BERT and the original
  Transformer (LN(x + f(x))), whose cross-attention form is one stream's half
  of a ViLBERT co-attention layer.
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  post_norm: bool = False
  layer_norm_epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x, context=None, present=None, *, mask=None,
               train: bool = False):
    attention = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.dropout,
        deterministic=not train, name="attention")
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_epsilon,
                                     name=name)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    ffn = FeedForward(self.mlp_dim, self.dropout, name="mlp")
    any_key = None
    if context is not None:
      if present is None or mask is not None:
        raise ValueError("cross-attention takes `present` [B] or [B, K], "
                         "not `mask`")
      mask = key_mask(present, x.shape[1], context.shape[1])
      any_key = present if present.ndim == 1 else jnp.any(present, axis=-1)

    def attend(queries, keys):
      update = drop(attention(queries, keys, mask=mask))
      return update if any_key is None else zero_masked(update, any_key)

    if self.post_norm:
      x = norm("norm_attention")(x + attend(
          x, x if context is None else context))
      return norm("norm_mlp")(x + drop(ffn(x, train=train)))
    y = norm("norm_attention")(x)
    x = x + attend(y, y if context is None else norm("norm_context")(context))
    return x + drop(ffn(norm("norm_mlp")(x), train=train))
