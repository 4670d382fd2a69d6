"""The one multimodal model: {modality: encoder} -> fusion -> head."""

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.encoders import ENCODERS, FRONTENDS
from mmjax.models.fusion import FUSIONS, Unimodal
from mmjax.models.layers import MLP


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


class MultimodalClassifier(nn.Module):
  """Encoders per modality, one fusion, one MLP head: batch -> logits [B, K].

  The batch is a dict of modality arrays plus a boolean `mask/<modality>` [B]
  per example (a missing modality is zeros with its mask False). Each
  modality's input goes through its optional front end (e.g. waveform [B, T]
  -> log-mel [B, F, T']) and its encoder to features [B, D_m]; the fusion
  (`FUSIONS[fusion]`) combines them honouring the masks; the head
  (`head_hidden` then `num_classes`) maps the fused representation to logits.
  Early fusion sees the front-end outputs instead of encoder features; late
  fusion applies its own per-modality heads and returns logits directly.

  Attributes:
    modalities: modality names the model reads from the batch.
    encoders: per modality, `{"name": <ENCODERS key>, **kwargs}` plus an
      optional `"frontend": {"name": <FRONTENDS key>, **kwargs}`.
    fusion: a `FUSIONS` key.
    fusion_kwargs: extra keyword arguments for the fusion module.
    num_classes: number of output classes K.
    head_hidden: hidden widths of the MLP head.
  """
  modalities: Sequence[str]
  encoders: Mapping[str, Mapping]
  fusion: str
  num_classes: int
  head_hidden: Sequence[int] = (100,)
  fusion_kwargs: Mapping | None = None

  def _make_fusion(self):
    kwargs = dict(self.fusion_kwargs or {})
    fusion_cls = FUSIONS[self.fusion]
    if getattr(fusion_cls, "returns_logits", False):
      kwargs.update(num_classes=self.num_classes, hidden=tuple(self.head_hidden))
    return fusion_cls(name="fusion", **kwargs)

  @nn.compact
  def __call__(self, batch, *, train: bool = False):
    fusion = self._make_fusion()
    used = ([fusion.modality] if isinstance(fusion, Unimodal)
            else list(self.modalities))
    masks = {m: batch[f"mask/{m}"] for m in used}
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
      features = {}
      for m in used:
        spec = {k: v for k, v in self.encoders[m].items() if k != "frontend"}
        features[m] = _build(ENCODERS, spec, name=f"encoder_{m}")(
            inputs[m], train=train)
      fused = fusion(features, masks, train=train)
    if getattr(fusion, "returns_logits", False):
      return fused
    return MLP((*self.head_hidden, self.num_classes), name="head")(fused)
