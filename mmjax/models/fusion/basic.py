"""Feature-level fusions: unimodal selection, concatenation, late, weighted sum.

Each first mean-pools a modality's tokens [B, N_m, D_m] to features [B, D_m].
Each computes in `dtype` and returns its output in `dtype`; parameters are
stored in `param_dtype` (`mmjax.models.precision`).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.layers import MLP, masked_mean, pool_tokens, zero_masked
from mmjax.models.precision import Dtype, to_compute


class Unimodal(nn.Module):
  """A unimodal baseline: one modality's pooled features [B, D], unchanged.

  The model builds only that modality's encoder. A masked example gives zeros.
  """
  modality: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32  # no parameters; for the common interface

  @nn.compact
  def __call__(self, tokens, masks, *, train: bool = False):
    del train
    x = to_compute(tokens[self.modality], self.dtype)
    return zero_masked(pool_tokens(x), masks[self.modality])


class ConcatFusion(nn.Module):
  """Intermediate fusion by concatenation: [B, sum_m D_m].

  Features of a masked modality are replaced by zeros, so they contribute
  nothing to the head (Baltrusaitis et al., "Multimodal Machine Learning: A
  Survey and Taxonomy", TPAMI 2019, model-agnostic intermediate fusion).
  Modalities are concatenated in sorted name order.
  """
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32  # no parameters; for the common interface

  @nn.compact
  def __call__(self, tokens, masks, *, train: bool = False):
    del train
    return jnp.concatenate(
        [zero_masked(pool_tokens(to_compute(tokens[m], self.dtype)), masks[m])
         for m in sorted(tokens)], -1)


class WeightedFusion(nn.Module):
  """Learned weighted sum of per-modality projections: [B, dim].

  Each modality is projected to `dim` by its own Dense layer; the projections
  are summed with weights softmax(w) over the modalities present in each
  example, where w is one learned scalar per modality (initialised equal).
  The weights are computed in float32, then cast to `dtype`.
  """
  dim: int = 128
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, masks, *, train: bool = False):
    del train
    names = sorted(tokens)
    projected = jnp.stack([nn.Dense(
        self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
        name=f"proj_{m}")(pool_tokens(tokens[m])) for m in names], 1)
    logits = self.param("modality_logits", nn.initializers.zeros, (len(names),),
                        self.param_dtype).astype(jnp.float32)
    present = jnp.stack([masks[m] for m in names], 1)  # [B, M]
    scores = jnp.exp(logits - jnp.max(logits)) * present
    weights = scores / jnp.maximum(jnp.sum(scores, 1, keepdims=True), 1e-9)
    return jnp.einsum("bm,bmd->bd", weights.astype(self.dtype), projected)


class LateFusion(nn.Module):
  """Late fusion: the mean of per-modality logits over the present modalities.

  Each modality has its own MLP head (hidden widths `hidden`, then
  `num_classes`); the fused logits average the heads of the modalities present
  in each example (renormalised over them). The per-modality logits are also
  sown into the `intermediates` collection as `modality_logits`, stacked
  [B, M, num_classes] in sorted modality order, for majority voting at eval
  (in float32 whatever `dtype` is; the returned logits are in `dtype`).
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
    logits = jnp.stack([
        MLP((*self.hidden, self.num_classes), dtype=self.dtype,
            param_dtype=self.param_dtype, name=f"head_{m}")(
                pool_tokens(tokens[m])) for m in names], 1)
    present = jnp.stack([masks[m] for m in names], 1)
    self.sow("intermediates", "modality_logits", logits.astype(jnp.float32))
    self.sow("intermediates", "modality_present", present)
    return masked_mean(logits, present)
