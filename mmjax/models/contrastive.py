"""Towers for contrastive training: batch -> L2-normalised embeddings."""

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.encoders import ENCODERS, FRONTENDS
from mmjax.models.layers import pool_tokens
from mmjax.models.multimodal import modality_input

# Initial (log scale, bias) per objective: CLIP's temperature 0.07 (Radford
# et al. 2021); SigLIP's scale 10 and bias -10 (Zhai et al. 2023).
INITIAL_LOGIT_PARAMS = {"softmax": (math.log(1 / 0.07), 0.0),
                        "sigmoid": (math.log(10.0), -10.0)}


class Tower(nn.Module):
  """One modality's tower: front end, encoder, mean pool, linear projection.

  Input [B, ...] -> embedding [B, embed_dim], L2-normalised. With
  `multi_item=True` the input is [B, C, ...] (e.g. C captions per image) and
  the output [B, C, embed_dim]: the C items are encoded as a batch of B * C.
  A `locked` tower stops gradients at its encoder's output, so its frozen
  encoder costs no backward pass.
  """
  encoder: Mapping
  embed_dim: int
  locked: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool,
               multi_item: bool = False) -> jnp.ndarray:
    lead = x.shape[:2] if multi_item else x.shape[:1]
    x = x.reshape((-1,) + x.shape[len(lead):])
    spec = dict(self.encoder)
    frontend = spec.pop("frontend", None)
    if frontend:
      kwargs = {k: v for k, v in frontend.items() if k != "name"}
      x = FRONTENDS[frontend["name"]](name="frontend", **kwargs)(x)
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    tokens = ENCODERS[spec["name"]](name="encoder", **kwargs)(x, train=train)
    if self.locked:  # no backward pass through a frozen encoder
      tokens = jax.lax.stop_gradient(tokens)
    z = nn.Dense(self.embed_dim, name="projection")(pool_tokens(tokens))
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    return z.reshape(lead + (self.embed_dim,))


class ContrastiveModel(nn.Module):
  """N towers with a shared embedding space: batch -> outputs dict.

  Returns {"embedding/<m>": [B, embed_dim] per modality, "log_scale": [],
  "bias": []}; the logit scale and bias are learned scalars initialised for
  `objective` (`INITIAL_LOGIT_PARAMS`). A batch that carries "valid/<m>"
  [B, C] holds C items of modality m per example (e.g. an eval split with
  every caption of an image); their embeddings are [B, C, embed_dim]. Each tower is `Tower`, named
  `tower_<m>`, so a pattern such as "tower_text/encoder/.*" selects one
  tower's encoder (e.g. to lock it, LiT).

  Attributes:
    modalities: the modalities (batch keys), one tower each.
    encoders: per modality an `ENCODERS` spec plus optional "frontend".
    embed_dim: width of the shared embedding space.
    objective: "softmax" or "sigmoid", for the initial scale and bias.
    locked: modalities whose encoder is frozen (see `Tower.locked`).

  Only the towers of modalities present in the batch run (e.g. the text
  tower alone to embed class prompts).
  """
  modalities: Sequence[str]
  encoders: Mapping[str, Mapping]
  embed_dim: int = 128
  objective: str = "softmax"
  locked: Sequence[str] = ()

  @nn.compact
  def __call__(self, batch, *, train: bool = False) -> dict:
    log_scale, bias = INITIAL_LOGIT_PARAMS[self.objective]
    out = {"log_scale": self.param("log_scale", nn.initializers.constant(
               log_scale), ()),
           "bias": self.param("bias", nn.initializers.constant(bias), ())}
    for m in self.modalities:
      if m not in batch:
        continue
      out[f"embedding/{m}"] = Tower(self.encoders[m], self.embed_dim,
                                    locked=m in self.locked,
                                    name=f"tower_{m}")(
          modality_input(batch, m), train=train,
          multi_item=f"valid/{m}" in batch)
    return out
