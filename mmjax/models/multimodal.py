"""The one multimodal model: {modality: encoder} -> fusion -> head."""

import functools
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.encoders import ENCODERS, FRONTENDS
from mmjax.models.fusion import FUSIONS, Unimodal
from mmjax.models.layers import MLP

MISSING = ("zero", "token")


def _build(registry: Mapping, spec: Mapping, **extra):
  """Instantiates `registry[spec["name"]]` with the rest of `spec` as kwargs."""
  kwargs = {k: v for k, v in spec.items() if k != "name"}
  return registry[spec["name"]](**kwargs, **extra)


def modality_input(batch: Mapping[str, jnp.ndarray], modality: str):
  """A modality's array from the batch as float; uint8 pixels scaled to [0, 1]."""
  x = batch[modality]
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 255.0
  return x


def drop_modalities(rng, masks: Mapping[str, jnp.ndarray],
                    rates: Mapping[str, float]) -> dict[str, jnp.ndarray]:
  """Modality dropout: masks [B] with modality m removed at rate `rates[m]`.

  Each example loses each modality independently with its probability; an
  example that would lose every present modality keeps its original masks
  (Neverova et al., "ModDrop: Adaptive Multi-Modal Gesture Recognition",
  TPAMI 2016, drop whole modalities while training).
  """
  names = sorted(masks)
  dropped = dict(masks)
  for i, m in enumerate(names):
    rate = rates.get(m, 0.0)
    if rate > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - rate,
                                  masks[m].shape)
      dropped[m] = masks[m] & keep
  anything_left = functools.reduce(jnp.logical_or, dropped.values())
  return {m: jnp.where(anything_left, dropped[m], masks[m]) for m in names}


class MultimodalClassifier(nn.Module):
  """Encoders per modality, one fusion, one MLP head: batch -> logits [B, K].

  The batch is a dict of modality arrays plus a boolean `mask/<modality>` [B]
  per example (a missing modality is zeros with its mask False). Each
  modality's input goes through its optional front end (e.g. waveform [B, T]
  -> log-mel [B, F, T']) and its encoder to tokens [B, N_m, D_m]; the fusion
  (`FUSIONS[fusion]`) combines them honouring the masks; the head
  (`head_hidden` then `num_classes`) maps the fused representation to logits.
  Early fusion sees the front-end outputs instead of encoder tokens; late
  fusion applies its own per-modality heads and returns logits directly.

  Missing modalities while training: `modality_dropout` maps a modality to
  the probability of removing it from an example (train only; see
  `drop_modalities`). `missing="zero"` leaves a missing modality out of the
  fusion through its mask; `missing="token"` instead replaces its tokens by a
  learned mask token per modality ([D_m], broadcast over its N_m positions)
  and marks it present, at train and eval alike.

  Attributes:
    modalities: modality names the model reads from the batch.
    encoders: per modality, `{"name": <ENCODERS key>, **kwargs}` plus an
      optional `"frontend": {"name": <FRONTENDS key>, **kwargs}`.
    fusion: a `FUSIONS` key.
    fusion_kwargs: extra keyword arguments for the fusion module.
    num_classes: number of output classes K.
    head_hidden: hidden widths of the MLP head.
    modality_dropout: {modality: probability} of dropping it while training.
    missing: "zero" or "token", how a missing modality reaches the fusion.
  """
  modalities: Sequence[str]
  encoders: Mapping[str, Mapping]
  fusion: str
  num_classes: int
  head_hidden: Sequence[int] = (100,)
  fusion_kwargs: Mapping | None = None
  modality_dropout: Mapping[str, float] | None = None
  missing: str = "zero"

  def _make_fusion(self):
    kwargs = dict(self.fusion_kwargs or {})
    fusion_cls = FUSIONS[self.fusion]
    if getattr(fusion_cls, "returns_logits", False):
      kwargs.update(num_classes=self.num_classes, hidden=tuple(self.head_hidden))
    return fusion_cls(name="fusion", **kwargs)

  @nn.compact
  def __call__(self, batch, *, train: bool = False):
    if self.missing not in MISSING:
      raise ValueError(f"missing={self.missing!r}; known: {', '.join(MISSING)}")
    fusion = self._make_fusion()
    used = ([fusion.modality] if isinstance(fusion, Unimodal)
            else list(self.modalities))
    masks = {m: batch[f"mask/{m}"] for m in used}
    if train and self.modality_dropout:
      masks = drop_modalities(self.make_rng("dropout"), masks,
                              self.modality_dropout)
    inputs = {}
    for m in used:
      x = modality_input(batch, m)
      spec = self.encoders[m]
      if spec.get("frontend"):
        x = _build(FRONTENDS, spec["frontend"], name=f"frontend_{m}")(x)
      inputs[m] = x
    if getattr(fusion, "takes_inputs", False):
      fused = fusion(inputs, masks, train=train)
    else:
      tokens = {}
      for m in used:
        spec = {k: v for k, v in self.encoders[m].items() if k != "frontend"}
        tokens[m] = _build(ENCODERS, spec, name=f"encoder_{m}")(
            inputs[m], train=train)
      if self.missing == "token":
        for m in used:
          mask_token = self.param(f"mask_token_{m}", nn.initializers.normal(0.02),
                                  (tokens[m].shape[-1],))
          present = masks[m][:, None, None]
          tokens[m] = jnp.where(present, tokens[m], mask_token)
          masks[m] = jnp.ones_like(masks[m])
      fused = fusion(tokens, masks, train=train)
    if getattr(fusion, "returns_logits", False):
      return fused
    return MLP((*self.head_hidden, self.num_classes), name="head")(fused)
