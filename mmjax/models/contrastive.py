"""Towers for contrastive training: batch -> L2-normalised embeddings."""

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import pool_tokens
from mmjax.models.multimodal import modality_input
from mmjax.models.precision import Dtype, to_compute, to_float32

# Initial (log scale, bias) per objective: CLIP's temperature 0.07 (Radford
# et al. 2021); SigLIP's scale 10 and bias -10 (Zhai et al. 2023).
INITIAL_LOGIT_PARAMS = {"softmax": (math.log(1 / 0.07), 0.0),
                        "sigmoid": (math.log(10.0), -10.0)}

# Tower projections: a Dense layer with a bias, one without (CLIP's), or
# none (SigLIP's image tower, whose attention-pooling head is the last layer).
PROJECTIONS = ("dense", "linear", "none")


class Tower(nn.Module):
  """One modality's tower: front end, encoder, mean pool, projection.

  Input [B, ...] -> embedding [B, embed_dim], L2-normalised. With
  `multi_item=True` the input is [B, C, ...] (e.g. C captions per image) and
  the output [B, C, embed_dim]: the C items are encoded as a batch of B * C.
  A `locked` tower stops gradients at its encoder's output, so its frozen
  encoder costs no backward pass.

  Attributes:
    encoder: the encoder module, input [B, ...] -> tokens [B, N, D]; named
      "encoder" in the parameter tree.
    embed_dim: width of the projection ("projection", [D, embed_dim]).
    projection: a `PROJECTIONS` name: "dense" (kernel and bias), "linear"
      (kernel only) or "none" (the pooled features are the embedding).
    frontend: optional module applied before the encoder ("frontend"), e.g.
      waveform [B, T] -> log-mel [B, F, T'].
    locked: stop gradients at the encoder's output.
    dtype: the compute dtype: the (front end's) input is cast to it and the
      projection computes in it; the embedding is normalised and returned
      in float32 whatever `dtype` is.
    param_dtype: the dtype of the projection's parameters.
  """
  encoder: nn.Module
  embed_dim: int
  projection: str = "dense"
  frontend: nn.Module | None = None
  locked: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool,
               multi_item: bool = False) -> jnp.ndarray:
    lead = x.shape[:2] if multi_item else x.shape[:1]
    x = x.reshape((-1,) + x.shape[len(lead):])
    if self.frontend is not None:  # attached by field name: "frontend"
      x = self.frontend(x)
    tokens = self.encoder(to_compute(x, self.dtype),
                          train=train)  # attached as "encoder"
    if self.locked:  # no backward pass through a frozen encoder
      tokens = jax.lax.stop_gradient(tokens)
    if self.projection not in PROJECTIONS:
      raise ValueError(f"projection must be one of {PROJECTIONS}, got "
                       f"{self.projection!r}")
    z = pool_tokens(tokens)
    if self.projection != "none":
      z = nn.Dense(self.embed_dim, use_bias=self.projection == "dense",
                   dtype=self.dtype, param_dtype=self.param_dtype,
                   name="projection")(z)
    z = to_float32(z)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    return z.reshape(lead + (self.embed_dim,))


def _detached(module: nn.Module | None) -> nn.Module | None:
  """An unbound copy of `module` (no parent, no name), which the module it is
  passed to names after the receiving field."""
  return None if module is None else module.clone(parent=None, name=None)


class ContrastiveModel(nn.Module):
  """N towers with a shared embedding space: batch -> outputs dict.

  Built from modules, e.g.

    ContrastiveModel(modalities=("image", "text"),
                     encoders={"image": ViT(...), "text": BertEncoder(...)},
                     embed_dim=128, objective="sigmoid", locked=("text",))

  (`mmjax.models.factory.build_contrastive` builds them from config names).
  Returns {"embedding/<m>": [B, embed_dim] per modality, "log_scale": [],
  "bias": []}; the logit scale and bias are learned scalars initialised for
  `objective` (`INITIAL_LOGIT_PARAMS`). A batch that carries "valid/<m>"
  [B, C] holds C items of modality m per example (e.g. an eval split with
  every caption of an image); their embeddings are [B, C, embed_dim]. Each
  tower is `Tower`, named `tower_<m>` with submodules "frontend", "encoder"
  and "projection", so a pattern such as "tower_text/encoder/.*" selects one
  tower's encoder (e.g. to lock it, LiT).

  Attributes:
    modalities: the modalities (batch keys), one tower each.
    encoders: per modality an encoder module, input [B, ...] -> tokens
      [B, N, D] (see `mmjax.models.encoders`); each tower gets its own copy.
    embed_dim: width of the shared embedding space.
    objective: "softmax" or "sigmoid", for the initial scale and bias.
    locked: modalities whose encoder is frozen (see `Tower.locked`).
    frontends: optional per-modality front ends applied before the encoder.
    projections: per modality a `PROJECTIONS` name (default "dense").

  Only the towers of modalities present in the batch run (e.g. the text
  tower alone to embed class prompts).

  Precision: `dtype` is the compute dtype of the towers (their inputs are
  cast to it, the encoders are built with it by `mmjax.models.factory`);
  every output (embeddings, log scale, bias) is float32, so the contrastive
  losses are computed in float32. `param_dtype` is the dtype of the
  parameters created here (projections, log scale, bias).
  """
  modalities: Sequence[str]
  encoders: Mapping[str, nn.Module]
  embed_dim: int = 128
  objective: str = "softmax"
  locked: Sequence[str] = ()
  frontends: Mapping[str, nn.Module] | None = None
  projections: Mapping[str, str] | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, batch, *, train: bool = False) -> dict:
    log_scale, bias = INITIAL_LOGIT_PARAMS[self.objective]
    out = {"log_scale": self.param("log_scale", nn.initializers.constant(
               log_scale), (), self.param_dtype),
           "bias": self.param("bias", nn.initializers.constant(bias), (),
                              self.param_dtype)}
    frontends = self.frontends or {}
    for m in self.modalities:
      if m not in batch:
        continue
      tower = Tower(_detached(self.encoders[m]), self.embed_dim,
                    projection=(self.projections or {}).get(m, "dense"),
                    frontend=_detached(frontends.get(m)),
                    locked=m in self.locked, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=f"tower_{m}")
      out[f"embedding/{m}"] = tower(modality_input(batch, m), train=train,
                                    multi_item=f"valid/{m}" in batch)
    return to_float32(out)
