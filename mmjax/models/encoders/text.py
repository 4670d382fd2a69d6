"""Text encoders over WordPiece token ids: BERT and a bag of embeddings.

Token ids are int32 [B, L]; id 0 is padding (`[PAD]` in BERT's vocabulary)
unless an explicit boolean `padding_mask` [B, L] (True at real tokens) is
given. The data package's `WordPieceTokenizer` makes both arrays, and
`mmjax.models.pretrained.load_minilm` gives pretrained BERT weights.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.layers import (NO_REMAT, TransformerBlock, key_mask,
                                 masked_mean, remat, scan_blocks)
from mmjax.models.precision import Dtype

POOLS = ("none", "mean", "cls")


def _padding_mask(token_ids, padding_mask):
  """The given mask as bool, or token_ids != 0 (id 0 is padding)."""
  if padding_mask is None:
    return token_ids != 0
  if padding_mask.shape != token_ids.shape:
    raise ValueError(f"padding_mask {padding_mask.shape} must have the shape "
                     f"of token_ids {token_ids.shape}")
  return padding_mask.astype(bool)


class BertEncoder(nn.Module):
  """A BERT-compatible Transformer encoder: ids [B, L] -> [B, L or 1, D].

  Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for
  Language Understanding", NAACL 2019: the input is the sum of word, learned
  absolute position and token-type (segment) embeddings, then LayerNorm and
  dropout; each of `num_layers` blocks is post-LayerNorm,
  x = LN(x + MHA(x)); x = LN(x + W2 GELU(W1 x)), with exact (erf) GELU.
  Padded keys are masked out of every attention, so the outputs at real tokens
  do not depend on what the padded positions hold. The parameter layout holds
  Hugging Face `BertModel` weights (see `mmjax.models.pretrained`); BERT's
  pooler (Dense + tanh on [CLS]) is not part of it.

  Attributes:
    vocab_size: number of WordPiece ids.
    hidden_size: width D.
    num_layers: number of Transformer blocks.
    num_heads: attention heads (D must be divisible by it).
    intermediate_size: hidden width of each feed-forward network.
    max_position_embeddings: longest input L.
    type_vocab_size: number of token types (segments).
    layer_norm_eps: LayerNorm epsilon (BERT: 1e-12).
    dropout: dropout rate of embeddings, attention probabilities and residual
      branches (used only when train=True, with the "dropout" RNG).
    pool: "none" returns every token [B, L, D]; "mean" the mean over real
      tokens [B, 1, D] (Sentence-BERT's pooling; zeros for an all-padding
      row); "cls" the first ([CLS]) token [B, 1, D].
    dtype: compute dtype (the output's); the embeddings are looked up in
      it, LayerNorm statistics and attention softmax stay float32.
    param_dtype: the dtype parameters are stored in.
    remat: a `mmjax.models.layers.REMAT_POLICIES` name; other than "none",
      each layer is rematerialised under that policy (same parameters).
    scan_layers: run the layers with `nn.scan` (`scan_blocks`): parameters
      "layers/..." stacked [num_layers, ...] instead of "layer_<i>" (off by
      default; pretrained weights load into the unrolled layout only).
  """
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout: float = 0.0
  pool: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = NO_REMAT
  scan_layers: bool = False

  @nn.compact
  def __call__(self, token_ids: jnp.ndarray, *, train: bool,
               padding_mask: jnp.ndarray | None = None,
               token_type_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """Encodes token ids.

    Args:
      token_ids: int [B, L], L <= max_position_embeddings.
      train: enables dropout.
      padding_mask: bool [B, L], True at real tokens; default token_ids != 0.
      token_type_ids: int [B, L] segment ids; default all 0.

    Returns:
      [B, L, D] token features for pool="none", else [B, 1, D].
    """
    if self.pool not in POOLS:
      raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
    if token_ids.ndim != 2:
      raise ValueError(f"token_ids must be [B, L], got {token_ids.shape}")
    length = token_ids.shape[1]
    if length > self.max_position_embeddings:
      raise ValueError(
          f"sequence length {length} exceeds max_position_embeddings="
          f"{self.max_position_embeddings}")
    present = _padding_mask(token_ids, padding_mask)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(token_ids)

    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embed = lambda n, name: nn.Embed(
        n, self.hidden_size, embedding_init=nn.initializers.normal(0.02),
        name=name, **precision)
    x = (embed(self.vocab_size, "word_embeddings")(token_ids)
         + embed(self.max_position_embeddings, "position_embeddings")(
             jnp.arange(length))[None]
         + embed(self.type_vocab_size, "type_embeddings")(token_type_ids))
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, name="embeddings_norm",
                     **precision)(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)

    mask = key_mask(present, length, length)
    block = functools.partial(
        remat(TransformerBlock, self.remat), num_heads=self.num_heads,
        mlp_dim=self.intermediate_size, dropout=self.dropout, post_norm=True,
        layer_norm_epsilon=self.layer_norm_eps, **precision)
    if self.scan_layers:
      x = scan_blocks(block(name="layers"), x, self.num_layers, mask=mask,
                      train=train)
    else:
      for i in range(self.num_layers):
        x = block(name=f"layer_{i}")(x, mask=mask, train=train)

    if self.pool == "mean":
      return masked_mean(x, present)[:, None]
    if self.pool == "cls":
      return x[:, :1]
    return x


class BagOfEmbeddings(nn.Module):
  """The bag-of-embeddings baseline: mean of token embeddings [B, 1, D].

  Joulin et al., "Bag of Tricks for Efficient Text Classification", EACL 2017
  (fastText): a sentence is the average of its word embeddings, optionally
  followed by a linear layer. Padded tokens are left out of the mean; an
  all-padding row gives zeros (then the Dense bias, if `features` is set).

  Attributes:
    vocab_size: number of token ids.
    dim: embedding width D.
    features: if set, a Dense layer maps the mean to this width.
    dtype: compute dtype (the output's); param_dtype: the parameters'.
  """
  vocab_size: int
  dim: int
  features: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, token_ids: jnp.ndarray, *, train: bool,
               padding_mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """token_ids int [B, L] (padding_mask bool [B, L], default ids != 0)
    -> [B, 1, D] (or [B, 1, features])."""
    del train
    present = _padding_mask(token_ids, padding_mask)
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Embed(self.vocab_size, self.dim, name="embeddings",
                 **precision)(token_ids)
    x = masked_mean(x, present)[:, None]
    if self.features is not None:
      x = nn.Dense(self.features, name="dense", **precision)(x)
    return x


TEXT_TRANSFORMER_POOLS = ("eos", "last", "none")


class TextTransformer(nn.Module):
  """The text tower of CLIP and SigLIP: ids [B, L] -> [B, 1, D] or [B, L, D].

  Radford et al., "Learning Transferable Visual Models From Natural Language
  Supervision", ICML 2021 (section 2.4: a 12-layer width-512 Transformer
  with masked, i.e. causal, self-attention; "the activations of the highest
  layer of the transformer at the [EOS] token are treated as the feature
  representation of the text", after a final LayerNorm), and Zhai et al.,
  "Sigmoid Loss for Language Image Pre-Training", ICCV 2023 (the same
  encoder without the causal mask, read at the last position). The input is
  the sum of token embeddings ("token_embedding") and a learned position
  table ("position_embedding" [max_length, D]); then `num_layers`
  pre-LayerNorm blocks `TransformerBlock` ("layer_<i>") and a final
  LayerNorm ("norm_out"). The layout holds Hugging Face `CLIPTextModel` and
  `SiglipTextModel` weights (`mmjax.models.clip`).

  Padding needs no mask: with `causal=True` the positions up to the end
  token never see what follows it, and SigLIP trains with padding attended
  to (as big_vision does), so padded rows are encoded exactly as there.

  Attributes:
    vocab_size, width, num_layers, num_heads, mlp_dim: the architecture.
    max_length: the position table's length, the longest input.
    causal: causal self-attention (CLIP) or bidirectional (SigLIP).
    pool: "eos" (the features at each row's end token, CLIP), "last" (at
      the last position, SigLIP) or "none" (every position).
    eos_id: the end token's id for pool="eos"; None takes each row's
      largest id, as OpenAI's CLIP does (its end token is the last id of
      its vocabulary).
    activation: the feed-forward's (`mmjax.models.layers.ACTIVATIONS`).
    layer_norm_epsilon: of every LayerNorm (CLIP 1e-5, SigLIP 1e-6).
    dropout: of embeddings, attention weights and residual branches.
    remat: a `mmjax.models.layers.REMAT_POLICIES` name for the blocks.
    dtype, param_dtype: compute and parameter dtypes.
  """
  vocab_size: int
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  max_length: int = 77
  causal: bool = True
  pool: str = "eos"
  eos_id: int | None = None
  activation: str = "quick_gelu"
  layer_norm_epsilon: float = 1e-5
  dropout: float = 0.0
  remat: str = NO_REMAT
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, token_ids: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """token_ids int [B, L], L <= max_length -> [B, 1, D] ([B, L, D] for
    pool="none")."""
    if self.pool not in TEXT_TRANSFORMER_POOLS:
      raise ValueError(f"pool must be one of {TEXT_TRANSFORMER_POOLS}, got "
                       f"{self.pool!r}")
    if token_ids.ndim != 2:
      raise ValueError(f"token_ids must be [B, L], got {token_ids.shape}")
    length = token_ids.shape[1]
    if length > self.max_length:
      raise ValueError(f"sequence length {length} exceeds max_length="
                       f"{self.max_length}")
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Embed(self.vocab_size, self.width,
                 embedding_init=nn.initializers.normal(0.02),
                 name="token_embedding", **precision)(token_ids)
    table = self.param("position_embedding", nn.initializers.normal(0.01),
                       (self.max_length, self.width), self.param_dtype)
    x = x + table[:length].astype(x.dtype)[None]
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    mask = nn.make_causal_mask(token_ids) if self.causal else None
    block = functools.partial(
        remat(TransformerBlock, self.remat), num_heads=self.num_heads,
        mlp_dim=self.mlp_dim, dropout=self.dropout, post_norm=False,
        layer_norm_epsilon=self.layer_norm_epsilon,
        activation=self.activation, **precision)
    for i in range(self.num_layers):
      x = block(name=f"layer_{i}")(x, mask=mask, train=train)
    x = nn.LayerNorm(self.layer_norm_epsilon, name="norm_out", **precision)(x)
    if self.pool == "none":
      return x
    if self.pool == "last":
      return x[:, -1:]
    end = (jnp.argmax(token_ids, axis=-1) if self.eos_id is None else
           jnp.argmax(token_ids == self.eos_id, axis=-1))
    return jnp.take_along_axis(x, end[:, None, None], axis=1)
