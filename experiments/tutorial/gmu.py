"""The Gated Multimodal Unit as a fusion defined outside mmjax.

Arevalo et al., "Gated Multimodal Units for Information Fusion", ICLR
Workshops 2017. A user's own module: mmjax finds it by the import string
`gmu:GatedMultimodalUnit` (with this folder on the Python path), e.g.

  PYTHONPATH=experiments/tutorial python -m mmjax.train \
      --config configs/avmnist.py --workdir /tmp/gmu \
      --config.model.fusion=gmu:GatedMultimodalUnit

For each modality m, a candidate h_m = tanh(W_m x_m) from its pooled features
x_m [B, D_m], and a gate from all modalities together, z = W_z [x_1; ...;
x_M] (one score per modality and feature). The fused vector is sum_m
softmax_m(z)_m * h_m [B, dim]; with two modalities the softmax is the paper's
z * h_1 + (1 - z) * h_2 with z = sigmoid(z_1 - z_2). A missing modality gets
gate score minus infinity and zero features, so the softmax renormalises over
the modalities present.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import pool_tokens, zero_masked


class GatedMultimodalUnit(nn.Module):
  """GMU fusion: tokens {m: [B, N_m, D_m]}, masks {m: [B]} -> [B, dim]."""
  dim: int = 128

  @nn.compact
  def __call__(self, tokens, masks, *, train: bool = False):
    del train
    names = sorted(tokens)
    features = [zero_masked(pool_tokens(tokens[m]), masks[m]) for m in names]
    candidates = jnp.stack([
        jnp.tanh(nn.Dense(self.dim, name=f"candidate_{m}")(x))
        for m, x in zip(names, features)], 1)  # [B, M, dim]
    scores = nn.Dense(len(names) * self.dim, name="gate")(
        jnp.concatenate(features, -1)).reshape(-1, len(names), self.dim)
    present = jnp.stack([masks[m] for m in names], 1)[..., None]  # [B, M, 1]
    gates = jax.nn.softmax(jnp.where(present, scores, -jnp.inf), axis=1)
    gates = jnp.where(present, gates, 0.0)  # all missing: zeros, not NaN
    return jnp.sum(gates * candidates, 1)
