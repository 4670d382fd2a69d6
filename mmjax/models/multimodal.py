"""The one multimodal model: {modality: encoder} -> fusion -> head.

The model takes its parts as modules (`mmjax.models.factory` builds them from
a config's names).
"""

import functools
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.fusion import Unimodal
from mmjax.models.layers import pool_tokens, zero_masked
from mmjax.models.precision import Dtype, to_compute, to_float32

MISSING = ("zero", "token")
# Per-modality linear classifiers next to the fused head (`unimodal_heads`).
UNIMODAL_HEADS = ("none", "probe", "aux")


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
  """Encoders per modality, one fusion, one head: batch -> logits [B, K].

  Built from modules (torchmultimodal style), e.g.

    MultimodalClassifier(
        modalities=("image", "audio"),
        encoders={"image": LeNet(6, 3), "audio": LeNet(6, 5)},
        frontends={"audio": LogMelSpectrogram(sample_rate=8000)},
        fusion=ConcatFusion(), head=MLP((100, 10)), num_classes=10)

  (`mmjax.models.factory.build_classifier` builds them from config names).
  Each module becomes its own submodule with its own parameters, named
  `encoder_<m>`, `frontend_<m>`, `fusion` and `head` in the parameter tree.

  The batch is a dict of modality arrays plus a boolean `mask/<modality>` [B]
  per example (a missing modality is zeros with its mask False). Each
  modality's input goes through its optional front end (e.g. waveform [B, T]
  -> log-mel [B, F, T']) and its encoder to tokens [B, N_m, D_m]; the fusion
  combines them honouring the masks, `fusion(tokens, masks, train=...)` ->
  [B, D]; the head maps the fused representation [B, D] to logits [B, K].
  A fusion class with `takes_inputs = True` (early fusion) sees the front-end
  outputs instead of encoder tokens (and `encoders` goes unused); one with
  `returns_logits = True` (late fusion) applies its own per-modality heads and
  returns logits directly (and `head` must be None). A `Unimodal` fusion reads
  one modality, and only that modality's front end and encoder run.

  Missing modalities while training: `modality_dropout` maps a modality to
  the probability of removing it from an example (train only; see
  `drop_modalities`). `missing="zero"` leaves a missing modality out of the
  fusion through its mask; `missing="token"` instead replaces its tokens by a
  learned mask token `mask_token_<m>` per modality ([D_m], broadcast over its
  N_m positions) and marks it present, at train and eval alike. Early fusion,
  which has no per-modality tokens, replaces the missing input itself by a
  learned value per channel ([C_m] for [B, H, W, C_m], one scalar for
  [B, H, W]).

  Unimodal heads (`unimodal_heads`, for imbalance studies and
  `mmjax.imbalance`): one linear classifier `unimodal_head_<m>` per modality m
  on its pooled encoder tokens, mean over N_m, [B, D_m] -> [B, K] (zeros where
  m is missing; taken before any mask token replaces them):
    "none"   no heads; the model returns the logits array [B, K].
    "probe"  the features pass `jax.lax.stop_gradient`: the head learns how
             linearly decodable each modality's representation is and leaves
             the encoders as they would be without it (the unimodal-probe
             accuracy of an imbalance study).
    "aux"    gradients flow into the encoders: the unimodal branches of
             G-Blending (Wang et al., CVPR 2020; facebookresearch/VMZ
             `create_av_resnet(g_blend=True)`, one FC per modality on its
             pooled last layer).
  With heads the model returns a dict: "logits" [B, K], and per modality m
  "unimodal_logits/<m>" [B, K] and "unimodal_present/<m>" [B] bool (m present
  in the example after modality dropout), so that losses and accuracies count
  only the examples that have m.

  Sown intermediates (collection "intermediates", read with
  `apply(..., mutable=["intermediates"])`; each value a 1-tuple; sowing
  changes neither outputs nor parameters):
    "fused"          [B, D] the fusion's output before the head; only when
                     the fusion does not return logits.
    "features/<m>"   [B, D_m] per modality m the model uses, with
                     per-modality encoders only (not `takes_inputs`): the
                     masked pooled encoder tokens
                     zero_masked(pool_tokens(tokens_m), present_m), taken
                     before any mask token replaces the tokens.
    "present/<m>"    [B] bool, whether m is in the example (after modality
                     dropout, before mask tokens mark it present); with
                     "features/<m>".
  The fusion sows its own under "fusion" (late fusion: "modality_logits"
  [B, M, K] and "modality_present" [B, M], modalities in sorted order). With
  `ConcatFusion`, "fused" is the "features/<m>" concatenated in sorted
  modality order, so a linear head's kernel splits by modality along those
  widths (OGM-GE's per-modality logits).

  Precision (`mmjax.models.precision`): `dtype` is the compute dtype. Each
  modality's input (after its front end, which computes in float32 itself)
  is cast to it where it is floating (uint8 pixels are first scaled to
  [0, 1] in float32); the encoders, fusion and heads compute in it (the
  modules are built with the same `dtype`, see `mmjax.models.factory`). The
  outputs (logits, unimodal logits) and the sown intermediates are float32
  whatever `dtype` is, so losses and metrics are computed in float32.
  `param_dtype` is the dtype of this module's own parameters (mask tokens,
  unimodal heads).

  Attributes:
    modalities: modality names the model reads from the batch.
    encoders: per modality, an encoder module: input [B, ...] -> tokens
      [B, N_m, D_m], called as `encoder(x, train=...)` (see
      `mmjax.models.encoders`).
    fusion: the fusion module (see `mmjax.models.fusion`).
    num_classes: number of output classes K (the width of unimodal heads).
    head: the module mapping the fused [B, D] to logits [B, K] (e.g.
      `MLP((*hidden, K))`); None when the fusion returns logits.
    frontends: optional per-modality front ends, e.g. waveform [B, T] ->
      log-mel [B, F, T'], applied before the encoder (or early fusion).
    modality_dropout: {modality: probability} of dropping it while training.
    missing: "zero" or "token", how a missing modality reaches the fusion.
    unimodal_heads: an `UNIMODAL_HEADS` entry (see above).
    dtype: the compute dtype (default float32).
    param_dtype: the dtype of the parameters created here (default float32).
  """
  modalities: Sequence[str]
  encoders: Mapping[str, nn.Module]
  fusion: nn.Module
  num_classes: int
  head: nn.Module | None = None
  frontends: Mapping[str, nn.Module] | None = None
  modality_dropout: Mapping[str, float] | None = None
  missing: str = "zero"
  unimodal_heads: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, batch, *, train: bool = False):
    if self.missing not in MISSING:
      raise ValueError(f"missing={self.missing!r}; known: {', '.join(MISSING)}")
    if self.unimodal_heads not in UNIMODAL_HEADS:
      raise ValueError(f"unimodal_heads={self.unimodal_heads!r}; known: "
                       f"{', '.join(UNIMODAL_HEADS)}")
    fusion = self.fusion  # attached by its field name: "fusion"
    returns_logits = getattr(fusion, "returns_logits", False)
    if returns_logits != (self.head is None):
      head = "None" if self.head is None else type(self.head).__name__
      raise ValueError("a fusion that returns logits takes head=None, any "
                       f"other a head module; got {type(fusion).__name__} "
                       f"and head={head}")
    used = ([fusion.modality] if isinstance(fusion, Unimodal)
            else list(self.modalities))
    masks = {m: batch[f"mask/{m}"] for m in used}
    if train and self.modality_dropout:
      masks = drop_modalities(self.make_rng("dropout"), masks,
                              self.modality_dropout)
    present = dict(masks)  # before mask tokens mark every modality present
    frontends = self.frontends or {}
    inputs = {}
    for m in used:
      x = modality_input(batch, m)
      if frontends.get(m) is not None:
        x = frontends[m].clone(parent=self, name=f"frontend_{m}")(x)
      inputs[m] = to_compute(x, self.dtype)
    if getattr(fusion, "takes_inputs", False):
      if self.unimodal_heads != "none":
        raise ValueError(f"unimodal_heads={self.unimodal_heads!r} needs "
                         f"per-modality encoders; fusion "
                         f"{type(fusion).__name__} has none")
      if self.missing == "token":  # a learned value per input channel
        self._replace_missing(inputs, masks, lambda x: x.shape[3:])
      fused = fusion(inputs, masks, train=train)
    else:
      lacking = [m for m in used if m not in self.encoders]
      if lacking:
        raise ValueError(f"no encoder for modality {lacking[0]!r} (encoders: "
                         f"{', '.join(sorted(self.encoders))})")
      tokens = {m: self.encoders[m].clone(parent=self, name=f"encoder_{m}")(
          inputs[m], train=train) for m in used}
      features = {m: zero_masked(pool_tokens(tokens[m]), present[m])
                  for m in used}
      for m in used:
        self.sow("intermediates", f"features/{m}", to_float32(features[m]))
        self.sow("intermediates", f"present/{m}", present[m])
      if self.missing == "token":  # a learned token [D_m] per modality
        self._replace_missing(tokens, masks, lambda x: x.shape[-1:])
      fused = fusion(tokens, masks, train=train)
    if returns_logits:
      logits = fused
    else:
      self.sow("intermediates", "fused", to_float32(fused))
      logits = self.head(fused)  # attached by its field name: "head"
    logits = to_float32(logits)
    if self.unimodal_heads == "none":
      return logits
    out = {"logits": logits}
    for m in used:
      x = features[m]
      if self.unimodal_heads == "probe":
        x = jax.lax.stop_gradient(x)
      out[f"unimodal_logits/{m}"] = to_float32(nn.Dense(
          self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
          name=f"unimodal_head_{m}")(x))
      out[f"unimodal_present/{m}"] = present[m]
    return out

  def _replace_missing(self, values: dict, masks: dict, token_shape):
    """`missing="token"`, in place: where modality m is masked, its array
    [B, ...] becomes the learned `mask_token_<m>` of shape
    `token_shape(values[m])` (broadcast over the rest) and m is marked present.
    """
    for m in values:
      token = self.param(f"mask_token_{m}", nn.initializers.normal(0.02),
                         token_shape(values[m]), self.param_dtype)
      mask = masks[m].reshape(-1, *(1,) * (values[m].ndim - 1))
      values[m] = jnp.where(mask, values[m], token.astype(values[m].dtype))
      masks[m] = jnp.ones_like(masks[m])
