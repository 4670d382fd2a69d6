"""Multimodal bottleneck transformer (MBT) fusion."""

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.layers import (NO_REMAT, TransformerBlock, masked_mean,
                                 remat, zero_masked)
from mmjax.models.precision import Dtype


class BottleneckFusion(nn.Module):
  """Attention-bottleneck fusion (MBT): token dicts -> [B, dim].

  Nagrani, Yang, Arnab, Jansen, Schmid and Sun, "Attention Bottlenecks for
  Multimodal Fusion", NeurIPS 2021. Each modality's tokens [B, N_m, D_m] are
  projected to `dim`, a learned CLS token is prepended and learned position
  embeddings [N_m + 1, dim] (sized from N_m at init) are added. Each modality
  has its own pre-LN transformer block per layer. Layers
  0 .. fusion_layer-1 run the modalities separately. From layer
  `fusion_layer` on, `num_bottlenecks` learned bottleneck tokens z (one
  parameter [num_bottlenecks, dim], broadcast over the batch) are the only
  path between modalities (paper eqs. 6-8):

    [x_m, z_m] = Block_m([x_m, z])   for each modality m
    z = mean over the present modalities of z_m   (z is kept if none is)

  fusion_layer=0 fuses from the first layer (early); fusion_layer=num_layers
  never exchanges information (late). The output is the mean over the present
  modalities of each modality's final CLS token after a final LayerNorm
  (shared by the modalities, as `encoder_norm` in the authors' code). The
  paper averages per-modality logits of a shared linear head; averaging the
  CLS representations before that head is the same for a linear head. The
  per-modality CLS tokens [B, M, dim] (sorted modality order) are sown into
  `intermediates` as `cls`.

  A masked modality's tokens are zeroed on input and it is left out of the
  bottleneck and output averages, so it contributes nothing. With every
  modality missing the output is zeros.

  Attributes:
    dim: model width.
    num_layers: transformer layers per modality.
    fusion_layer: first layer that exchanges information through bottlenecks.
    num_bottlenecks: bottleneck tokens.
    num_heads: attention heads.
    mlp_dim: feed-forward width; None means 4 * dim.
    dropout: dropout rate (train only).
    dtype: compute dtype (the output's); LayerNorm statistics and attention
      softmax stay float32. param_dtype: the parameters' dtype.
    remat: a `mmjax.models.layers.REMAT_POLICIES` name; other than "none",
      each transformer block is rematerialised (same parameters).
  """
  dim: int = 64
  num_layers: int = 4
  fusion_layer: int = 2
  num_bottlenecks: int = 4
  num_heads: int = 4
  mlp_dim: int | None = None
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = NO_REMAT

  def _embed(self, name: str, tokens: jnp.ndarray) -> jnp.ndarray:
    """[B, N, D_m] -> [B, N + 1, dim]: projection, CLS token, positions."""
    x = nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 name=f"proj_{name}")(tokens)
    cls = self.param(f"cls_{name}", nn.initializers.zeros, (1, 1, self.dim),
                     self.param_dtype).astype(x.dtype)
    x = jnp.concatenate(
        [jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)), x], 1)
    position = self.param(f"position_{name}", nn.initializers.normal(0.02),
                          (x.shape[1], self.dim), self.param_dtype)
    return x + position.astype(x.dtype)

  @nn.compact
  def __call__(self, tokens, masks, *, train: bool = False):
    if not 0 <= self.fusion_layer <= self.num_layers:
      raise ValueError(f"fusion_layer={self.fusion_layer} is outside "
                       f"[0, num_layers={self.num_layers}]")
    names = sorted(tokens)
    x = {m: self._embed(m, zero_masked(tokens[m], masks[m])) for m in names}
    present = jnp.stack([masks[m] for m in names], 1).astype(bool)  # [B, M]
    batch = present.shape[0]
    mlp_dim = self.mlp_dim or 4 * self.dim
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = remat(TransformerBlock, self.remat)
    z = None
    for layer in range(self.num_layers):
      blocks = {m: block(self.num_heads, mlp_dim, self.dropout,
                         name=f"block_{layer}_{m}", **precision)
                for m in names}
      if layer < self.fusion_layer:
        x = {m: blocks[m](x[m], train=train) for m in names}
        continue
      if z is None:
        z = self.param("bottleneck", nn.initializers.normal(0.02),
                       (self.num_bottlenecks, self.dim), self.param_dtype)
        z = jnp.broadcast_to(z.astype(self.dtype),
                             (batch, self.num_bottlenecks, self.dim))
      updates = []
      for m in names:
        length = x[m].shape[1]
        out = blocks[m](jnp.concatenate([x[m], z], 1), train=train)
        x[m], z_m = out[:, :length], out[:, length:]
        updates.append(z_m)
      fused = masked_mean(jnp.stack(updates, 1), present)
      z = jnp.where(jnp.any(present, 1)[:, None, None], fused, z)
    norm = nn.LayerNorm(epsilon=1e-6, name="encoder_norm", **precision)
    cls = jnp.stack([norm(x[m][:, 0]) for m in names], 1)  # [B, M, dim]
    self.sow("intermediates", "cls", cls)
    return masked_mean(cls, present)
