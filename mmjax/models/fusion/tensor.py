"""Multiplicative fusions (tensor and low-rank tensor) and hybrid fusion.

Every fusion here takes encoder tokens and boolean masks,

  fusion(tokens: dict[str, [B, N_m, D_m]], masks: dict[str, [B]], train=...)

mean-pools each modality's tokens to [B, D_m] and processes the modalities in
sorted name order. A masked modality contributes nothing to the output. Each
computes in `dtype` (its output's dtype) and stores its parameters in
`param_dtype` (`mmjax.models.precision`).
"""

from collections.abc import Sequence
import string

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.layers import MLP, masked_mean, pool_tokens, zero_masked
from mmjax.models.precision import Dtype, to_compute


def _append_one(h: jnp.ndarray) -> jnp.ndarray:
  """[B, D] -> [B, D + 1]: the features followed by a constant 1."""
  return jnp.concatenate([h, jnp.ones(h.shape[:-1] + (1,), h.dtype)], -1)


def outer_product(zs: Sequence[jnp.ndarray]) -> jnp.ndarray:
  """Flattened batched outer product: M arrays [B, K_m] -> [B, prod_m K_m].

  The first array's index varies slowest (row-major flattening).
  """
  letters = string.ascii_letters.replace("z", "")
  if len(zs) > len(letters):
    raise ValueError(f"outer_product supports at most {len(letters)} arrays")
  inputs = ",".join(f"z{letters[i]}" for i in range(len(zs)))
  output = "z" + letters[:len(zs)]
  product = jnp.einsum(f"{inputs}->{output}", *zs)
  return product.reshape(product.shape[0], -1)


class TensorFusion(nn.Module):
  """Tensor Fusion Network fusion: [B, prod_m (dim + 1)] or [B, out_dim].

  Zadeh, Chen, Poria, Cambria, Morency, "Tensor Fusion Network for Multimodal
  Sentiment Analysis", EMNLP 2017. Each modality's pooled features are
  projected by its own Dense layer to h_m [B, dim] and extended with a
  constant 1, z_m = [h_m; 1]; the fused representation is the flattened outer
  product z_1 (x) z_2 (x) ... (x) z_M. Because of the appended 1 the product
  holds every unimodal term h_m, every bimodal term h_m (x) h_n, ..., and the
  full M-modal term. The paper's subnetworks are replaced by the encoders in
  front of this module; the projection keeps the product small: the default
  `dim=16` gives 17**M features (289 for two modalities, 4913 for three).

  A missing modality has h_m set to zero but keeps its 1, so z_m = [0; 1] and
  the product reduces to the tensor fusion of the remaining modalities (all
  their unimodal and cross-modal terms survive, everything involving the
  missing one is zero) -- the reason TFN appends the 1. With every modality
  missing the product is all zeros except a 1 in its last entry.

  Attributes:
    dim: width each modality is projected to before the outer product.
    out_dim: if > 0, a final Dense layer maps the product to [B, out_dim];
      0 (default) returns the product itself.
  """
  dim: int = 16
  out_dim: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, masks, *, train: bool = False):
    del train
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    zs = []
    for m in sorted(tokens):
      h = nn.Dense(self.dim, name=f"proj_{m}", **precision)(
          pool_tokens(tokens[m]))
      zs.append(_append_one(zero_masked(h, masks[m])))
    fused = outer_product(zs)
    if self.out_dim:
      fused = nn.Dense(self.out_dim, name="out", **precision)(fused)
    return fused


class LowRankTensorFusion(nn.Module):
  """Low-rank Multimodal Fusion (LMF): [B, out_dim].

  Liu, Shen, Lakshminarasimhan, Liang, Zadeh, Morency, "Efficient Low-rank
  Multimodal Fusion with Modality-Specific Factors", ACL 2018. With
  z_m = [h_m; 1] (h_m the pooled features, [B, D_m]) the tensor-fusion
  output W . (z_1 (x) ... (x) z_M) + b is computed with a weight tensor
  decomposed into rank-`rank` modality-specific factors W_m [rank, D_m + 1,
  out_dim], without forming the outer product:

    fused = sum_r w_r * prod_m (z_m @ W_m[r]) + b,

  equal to the full product contracted with
  W = sum_r w_r * (W_1[r] (x) ... (x) W_M[r]). As in the authors' reference
  code (Justin1904/Low-rank-Multimodal-Fusion `LMF`), each factor
  `factor_<m>` is a parameter of shape [rank, D_m + 1, out_dim] drawn by
  PyTorch's `xavier_normal_`, whose fans for a 3-D tensor are fan_in =
  (D_m + 1) * out_dim and fan_out = rank * out_dim (dimension 1 and 0 times
  the receptive field, the remaining dimension): std = sqrt(2 / (fan_in +
  fan_out)). `fusion_weights` is [1, rank] (`xavier_normal_`: fans rank and
  1) and `fusion_bias` [1, out_dim] (zeros).

  A missing modality has h_m set to zero and keeps its 1 (as in
  `TensorFusion`), so its factor contributes only its last row W_m[r, -1].

  Attributes:
    rank: rank of the weight-tensor decomposition.
    out_dim: width of the fused representation.
  """
  rank: int = 4
  out_dim: int = 64
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, masks, *, train: bool = False):
    del train
    # torch's xavier_normal_: fan_in = shape[1] * rf, fan_out = shape[0] * rf,
    # rf the product of the other dimensions (here out_dim); untruncated.
    factor_init = nn.initializers.variance_scaling(1.0, "fan_avg", "normal",
                                                   in_axis=1, out_axis=0)
    param = lambda name, init, shape: self.param(
        name, init, shape, self.param_dtype).astype(self.dtype)
    product = None
    for m in sorted(tokens):
      h = zero_masked(pool_tokens(to_compute(tokens[m], self.dtype)),
                      masks[m])
      z = _append_one(h)  # [B, D_m + 1]
      factor = param(f"factor_{m}", factor_init,
                     (self.rank, z.shape[-1], self.out_dim))
      projected = jnp.einsum("bd,rdo->rbo", z, factor)  # [rank, B, out_dim]
      product = projected if product is None else product * projected
    weights = param("fusion_weights", nn.initializers.variance_scaling(
        1.0, "fan_avg", "normal", in_axis=1, out_axis=0), (1, self.rank))
    bias = param("fusion_bias", nn.initializers.zeros, (1, self.out_dim))
    return jnp.einsum("r,rbo->bo", weights[0], product) + bias


class HybridFusion(nn.Module):
  """Hybrid fusion: a learned mix of intermediate- and late-fusion logits.

  Atrey, Hossain, El Saddik, Kankanhalli, "Multimodal fusion for multimedia
  analysis: a survey", Multimedia Systems 2010, call "hybrid" a fusion that
  combines feature-level (early) and decision-level (late) fusion. This module
  receives encoder tokens, not raw inputs, so its feature-level branch is
  intermediate fusion by concatenation: an MLP (`hidden`, then
  `num_classes`) over the concatenated pooled features, with a masked
  modality's features set to zero. The decision-level branch is `LateFusion`:
  one MLP head per modality whose logits are averaged over the modalities
  present in each example. The two are mixed with one learned scalar `a`
  (initialised to 0, so both branches start at weight 0.5):

    logits = sigmoid(a) * intermediate_logits + (1 - sigmoid(a)) * late_logits.

  It is a simple combination of two standard branches, not a method from a
  specific paper. Like `LateFusion` it returns logits [B, num_classes] and
  sows into `intermediates` the per-modality logits `modality_logits`
  [B, M, num_classes] (sorted modality order), `modality_present` [B, M] and
  the intermediate branch's `intermediate_logits` [B, num_classes]. With every
  modality missing the logits are sigmoid(a) times the intermediate head's
  output on zeros (finite).

  Attributes:
    num_classes: number of output logits.
    hidden: hidden widths of the intermediate and per-modality MLP heads.
  """
  num_classes: int
  hidden: Sequence[int] = (100,)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  returns_logits = True

  @nn.compact
  def __call__(self, tokens, masks, *, train: bool = False):
    del train
    names = sorted(tokens)
    pooled = [zero_masked(pool_tokens(tokens[m]), masks[m]) for m in names]
    widths = (*self.hidden, self.num_classes)
    mlp = lambda name: MLP(widths, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=name)
    intermediate = mlp("head_intermediate")(jnp.concatenate(pooled, -1))
    logits = jnp.stack([mlp(f"head_{m}")(h) for m, h in zip(names, pooled)],
                       1)
    present = jnp.stack([masks[m] for m in names], 1)
    # Sown logits in float32 (evaluators read them), returned ones in dtype.
    self.sow("intermediates", "modality_logits", logits.astype(jnp.float32))
    self.sow("intermediates", "modality_present", present)
    self.sow("intermediates", "intermediate_logits",
             intermediate.astype(jnp.float32))
    late = masked_mean(logits, present)
    mix = nn.sigmoid(self.param("mix", nn.initializers.zeros, (),
                                self.param_dtype).astype(jnp.float32))
    return (mix * intermediate + (1 - mix) * late).astype(self.dtype)
