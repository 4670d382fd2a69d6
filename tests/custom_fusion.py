"""A fusion defined outside mmjax, chosen by import string.

With tests/ on the Python path, `custom_fusion:GatedSum` names `GatedSum`
wherever a config names a fusion (`mmjax.registry.lookup("model.fusion",
...)`), e.g.

  PYTHONPATH=tests python -m mmjax.sweep \
      --config.model.fusion=custom_fusion:GatedSum

It depends on flax and jax only, so that it stays a stand-in for a user's own
module, and follows the fusion call API of `mmjax.models.fusion`.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp


class GatedSum(nn.Module):
  """A learned gated sum of the modalities' pooled tokens: [B, dim].

  A multi-modality form of the gated multimodal unit (Arevalo et al., "Gated
  Multimodal Units for Information Fusion", ICLR workshop 2017). Modality m's
  tokens [B, N_m, D_m] are mean-pooled to x_m [B, D_m] (zeros where m is
  masked), projected to a common width `dim` as h_m = tanh(W_m x_m + b_m), and
  gated per feature by z_m = sigmoid(V_m [x_1; ...; x_M] + c_m), computed
  from every modality's pooled features:

    out = sum over present m of z_m * h_m

  A masked modality's tokens reach neither its term (dropped) nor the gates
  (zeroed), so they change nothing; an example with no modality gives zeros.
  Modalities are visited in sorted name order. The constructor takes keyword
  arguments only, all with defaults.
  """
  _: dataclasses.KW_ONLY
  dim: int = 64

  @nn.compact
  def __call__(self, tokens, masks, *, train: bool = False):
    del train
    names = sorted(tokens)
    pooled = {m: jnp.where(masks[m][:, None], jnp.mean(tokens[m], axis=1), 0)
              for m in names}
    joint = jnp.concatenate([pooled[m] for m in names], -1)
    out = 0.0
    for m in names:
      h = jnp.tanh(nn.Dense(self.dim, name=f"proj_{m}")(pooled[m]))
      z = nn.sigmoid(nn.Dense(self.dim, name=f"gate_{m}")(joint))
      out = out + jnp.where(masks[m][:, None], z * h, 0)
    return out
