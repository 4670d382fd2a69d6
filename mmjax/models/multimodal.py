"""The one multimodal model: {modality: encoder} -> fusion -> head."""

import functools
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.encoders import ENCODERS, FRONTENDS
from mmjax.models.fusion import FUSIONS, Unimodal
from mmjax.models.layers import MLP, pool_tokens, zero_masked

MISSING = ("zero", "token")
# Per-modality linear classifiers next to the fused head (`unimodal_heads`).
UNIMODAL_HEADS = ("none", "probe", "aux", "decomposed")


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
  and marks it present, at train and eval alike. Early fusion, which has no
  per-modality tokens, replaces the missing input itself by a learned value
  per channel ([C_m] for [B, H, W, C_m], one scalar for [B, H, W]).

  Unimodal heads (`unimodal_heads`, for imbalance studies and
  `mmjax.imbalance`): one linear classifier per modality m on its pooled
  encoder tokens, mean over N_m, [B, D_m] -> [B, K] (zeros where m is
  missing; taken before any mask token replaces them):
    "none"        no heads; the model returns the logits array [B, K].
    "probe"       the features pass `jax.lax.stop_gradient`: the head learns
                  how linearly decodable each modality's representation is
                  and leaves the encoders as they would be without it (the
                  unimodal-probe accuracy of an imbalance study).
    "aux"         gradients flow into the encoders: the unimodal branches of
                  G-Blending (Wang et al., CVPR 2020; facebookresearch/VMZ
                  `create_av_resnet(g_blend=True)`, one FC per modality on its
                  pooled last layer).
    "decomposed"  no new parameters: the fused linear head of concatenation
                  (fusion "concat", `head_hidden=()`) split by modality,
                  W_m f_m + b / M, as OGM-GE scores each modality (Peng et al.,
                  CVPR 2022; GeWu-Lab/OGM-GE_CVPR2022 `main.py`, out_a/out_v
                  with `fc_out.bias / 2` for two modalities). The M parts sum
                  to the fused logits.
  With heads the model returns a dict: "logits" [B, K], and per modality m
  "unimodal_logits/<m>" [B, K] and "unimodal_present/<m>" [B] bool (m present
  in the example after modality dropout), so that losses and accuracies count
  only the examples that have m.

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
    unimodal_heads: an `UNIMODAL_HEADS` entry (see above).
  """
  modalities: Sequence[str]
  encoders: Mapping[str, Mapping]
  fusion: str
  num_classes: int
  head_hidden: Sequence[int] = (100,)
  fusion_kwargs: Mapping | None = None
  modality_dropout: Mapping[str, float] | None = None
  missing: str = "zero"
  unimodal_heads: str = "none"

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
    if self.unimodal_heads not in UNIMODAL_HEADS:
      raise ValueError(f"unimodal_heads={self.unimodal_heads!r}; known: "
                       f"{', '.join(UNIMODAL_HEADS)}")
    fusion = self._make_fusion()
    used = ([fusion.modality] if isinstance(fusion, Unimodal)
            else list(self.modalities))
    masks = {m: batch[f"mask/{m}"] for m in used}
    if train and self.modality_dropout:
      masks = drop_modalities(self.make_rng("dropout"), masks,
                              self.modality_dropout)
    present = dict(masks)  # before mask tokens mark every modality present
    inputs = {}
    for m in used:
      x = modality_input(batch, m)
      spec = self.encoders[m]
      if spec.get("frontend"):
        x = _build(FRONTENDS, spec["frontend"], name=f"frontend_{m}")(x)
      inputs[m] = x
    tokens = {}
    if getattr(fusion, "takes_inputs", False):
      if self.unimodal_heads != "none":
        raise ValueError(f"unimodal_heads={self.unimodal_heads!r} needs "
                         f"per-modality encoders; fusion {self.fusion!r} has "
                         "none")
      if self.missing == "token":  # a learned value per input channel
        self._replace_missing(inputs, masks, lambda x: x.shape[3:])
      fused = fusion(inputs, masks, train=train)
    else:
      for m in used:
        spec = {k: v for k, v in self.encoders[m].items() if k != "frontend"}
        tokens[m] = _build(ENCODERS, spec, name=f"encoder_{m}")(
            inputs[m], train=train)
      features = {m: zero_masked(pool_tokens(tokens[m]), present[m])
                  for m in used if self.unimodal_heads in ("probe", "aux")}
      if self.missing == "token":  # a learned token [D_m] per modality
        self._replace_missing(tokens, masks, lambda x: x.shape[-1:])
      fused = fusion(tokens, masks, train=train)
    if getattr(fusion, "returns_logits", False):
      logits, head = fused, None
    else:
      head = MLP((*self.head_hidden, self.num_classes), name="head")
      logits = head(fused)
    if self.unimodal_heads == "none":
      return logits
    if self.unimodal_heads == "decomposed":
      unimodal = self._decomposed_logits(head, fused, used, tokens)
    else:
      unimodal = {}
      for m in used:
        x = features[m]
        if self.unimodal_heads == "probe":
          x = jax.lax.stop_gradient(x)
        unimodal[m] = nn.Dense(self.num_classes,
                               name=f"unimodal_head_{m}")(x)
    out = {"logits": logits}
    for m in used:
      out[f"unimodal_logits/{m}"] = unimodal[m]
      out[f"unimodal_present/{m}"] = present[m]
    return out

  def _replace_missing(self, values: dict, masks: dict, token_shape):
    """`missing="token"`, in place: where modality m is masked, its array
    [B, ...] becomes the learned `mask_token_<m>` of shape
    `token_shape(values[m])` (broadcast over the rest) and m is marked present.
    """
    for m in values:
      token = self.param(f"mask_token_{m}", nn.initializers.normal(0.02),
                         token_shape(values[m]))
      mask = masks[m].reshape(-1, *(1,) * (values[m].ndim - 1))
      values[m] = jnp.where(mask, values[m], token)
      masks[m] = jnp.ones_like(masks[m])

  def _decomposed_logits(self, head, fused, used, tokens) -> dict:
    """The linear concat head by modality: {m: f_m W_m + b / M} [B, K] each.

    `fused` [B, sum_m D_m] holds the masked pooled features f_m in sorted
    modality order (`ConcatFusion`); W_m are the matching rows of the head's
    kernel [sum_m D_m, K], b its bias [K].
    """
    if self.fusion != "concat" or tuple(self.head_hidden):
      raise ValueError("unimodal_heads='decomposed' needs fusion 'concat' and "
                       f"head_hidden=(), got {self.fusion!r} and "
                       f"{tuple(self.head_hidden)}")
    dense = head.variables["params"]["dense_0"]
    out, start = {}, 0
    for m in sorted(used):
      width = tokens[m].shape[-1]
      out[m] = (fused[:, start:start + width] @
                dense["kernel"][start:start + width] +
                dense["bias"] / len(used))
      start += width
    return out
