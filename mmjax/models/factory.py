"""Models from config names: the one place where names become modules.

`MultimodalClassifier` and `ContrastiveModel` take modules; these factories
look up the names a config holds and build them:

  build_model(config)              the classifier (objective "supervised"),
                                   the generative model ("captioning") or
                                   the contrastive towers, from the whole
                                   ml_collections config
  classifier_from_config(config)   the classifier from `config.modalities`
                                   and `config.model`
  contrastive_from_config(config)  the towers, `config.frozen` locking encoders
  generative_from_config(config)   the encoders and text decoder
  build_classifier(...)            the classifier from plain specs
  build_generative(...)            the generative model from plain specs
  build_contrastive(...)           the towers from plain specs
  build_encoders(...)              {modality: encoder}, {modality: front end}

An encoder spec is `{"name": <ENCODERS key>, **kwargs}` plus an optional
`"frontend": {"name": <FRONTENDS key>, **kwargs}`; a fusion is a `FUSIONS`
key. Every name may also be an import string `package.module:Name`
(`mmjax.registry.lookup`), e.g. `--config.model.fusion=my_fusions:Gated`.
A fusion class may set `returns_logits = True` (it is then built with
`num_classes` and `hidden`, and the model gets no head) or
`takes_inputs = True` (early fusion: no per-modality encoders are built).

Precision and memory, model-wide (`config.dtype`, `config.param_dtype`,
`config.remat`, `config.scan_layers`; defaults "float32", "float32", "none",
False): every module is built with the compute dtype `dtype`, the parameter
dtype `param_dtype`, the remat policy `remat` (a
`mmjax.models.layers.REMAT_POLICIES` name) and `scan_layers` (ViT, AST and
BERT run their layers with `nn.scan`, a different parameter layout), each
passed to a class only if it declares that field (an encoder, front end or
fusion from outside mmjax may lack them) and its spec or `fusion_kwargs`
does not set it.
"""

import functools
import re
from collections.abc import Mapping, Sequence

import jax.numpy as jnp

from mmjax import registry
from mmjax.models import precision
from mmjax.models.coca import coca_from_config
from mmjax.models.contrastive import ContrastiveModel
from mmjax.models.decoder import TextDecoder
from mmjax.models.generative import GenerativeModel
from mmjax.models.encoders import ENCODERS, FRONTENDS
from mmjax.models.fusion import FUSIONS, Unimodal
from mmjax.models.layers import MLP, NO_REMAT, checkpoint_policy
from mmjax.models.multimodal import MultimodalClassifier
from mmjax.models.spec import from_spec, supported


def _plain(value):
  """A plain-dict copy of a ConfigDict or dict (tuples and lists as lists)."""
  if hasattr(value, "items"):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  return value


def _class_attribute(factory, attribute: str):
  """`attribute` of a registry entry: a class or a functools.partial of one."""
  while isinstance(factory, functools.partial):
    factory = factory.func
  return getattr(factory, attribute, False)


def model_options(dtype="float32", param_dtype="float32",
                  remat: str = NO_REMAT, scan_layers: bool = False) -> dict:
  """{"dtype", "param_dtype", "remat", "scan_layers"}: the dtypes as NumPy
  dtypes (from a `mmjax.models.precision.DTYPES` name or a dtype), the remat
  policy name (checked: ValueError for an unknown name) and whether deep
  encoders scan their layers."""
  as_dtype = lambda d: (precision.dtype_of(d) if isinstance(d, str)
                        else jnp.dtype(d))
  checkpoint_policy(remat)
  return {"dtype": as_dtype(dtype), "param_dtype": as_dtype(param_dtype),
          "remat": remat, "scan_layers": bool(scan_layers)}


def build_encoders(specs: Mapping[str, Mapping], modalities: Sequence[str], *,
                   encoders: bool = True, key: str = "model.encoders",
                   options: Mapping | None = None) -> tuple[dict, dict]:
  """Encoder and front-end modules from specs.

  Args:
    specs: per modality `{"name": <ENCODERS key>, **kwargs}` plus an optional
      `"frontend": {"name": <FRONTENDS key>, **kwargs}`.
    modalities: the modalities to build.
    encoders: False builds the front ends only (early fusion).
    key: the config key of `specs`, for error messages.
    options: `model_options(...)`, passed to each class that declares them
      (default: float32, no remat).

  Returns:
    ({modality: encoder}, {modality: front end}), the second only for the
    modalities whose spec has a front end.
  """
  options = model_options() if options is None else options
  built, frontends = {}, {}
  for m in modalities:
    spec = dict(specs[m])
    frontend = spec.pop("frontend", None)
    if frontend:
      frontends[m] = from_spec(f"{key}.{m}.frontend", frontend, FRONTENDS,
                               options=options)
    if encoders:
      built[m] = from_spec(f"{key}.{m}", spec, ENCODERS, options=options)
  return built, frontends


def build_classifier(*, modalities: Sequence[str],
                     encoders: Mapping[str, Mapping], fusion: str,
                     num_classes: int, head_hidden: Sequence[int] = (100,),
                     fusion_kwargs: Mapping | None = None,
                     modality_dropout: Mapping[str, float] | None = None,
                     missing: str = "zero",
                     unimodal_heads: str = "none", dtype="float32",
                     param_dtype="float32", remat: str = NO_REMAT,
                     scan_layers: bool = False) -> MultimodalClassifier:
  """`MultimodalClassifier` from names.

  Args:
    modalities: modality names the model reads from the batch.
    encoders: per modality an encoder spec (see `build_encoders`).
    fusion: a `FUSIONS` key or import string.
    num_classes: number of output classes K.
    head_hidden: hidden widths of the MLP head [B, D] -> [B, K] (of the
      fusion's own heads where it returns logits).
    fusion_kwargs: extra keyword arguments for the fusion module.
    modality_dropout, missing, unimodal_heads: as `MultimodalClassifier`.
    dtype, param_dtype: compute and parameter dtypes of every module (names
      of `mmjax.models.precision.DTYPES` or dtypes).
    remat: the remat policy of every transformer block (module docstring).
    scan_layers: ViT, AST and BERT encoders scan their layers.
  """
  options = model_options(dtype, param_dtype, remat, scan_layers)
  fusion_cls = registry.lookup("model.fusion", fusion, FUSIONS)
  kwargs = dict(fusion_kwargs or {})
  returns_logits = _class_attribute(fusion_cls, "returns_logits")
  if returns_logits:
    kwargs.update(num_classes=num_classes, hidden=tuple(head_hidden))
  for k, v in supported(fusion_cls, options).items():
    kwargs.setdefault(k, v)
  fusion_module = fusion_cls(**kwargs)
  used = ([fusion_module.modality] if isinstance(fusion_module, Unimodal)
          else list(modalities))
  encoder_modules, frontends = build_encoders(
      encoders, used,
      encoders=not _class_attribute(fusion_cls, "takes_inputs"),
      options=options)
  dtypes = dict(dtype=options["dtype"], param_dtype=options["param_dtype"])
  return MultimodalClassifier(
      modalities=tuple(modalities), encoders=encoder_modules,
      frontends=frontends, fusion=fusion_module, num_classes=num_classes,
      head=None if returns_logits else MLP((*head_hidden, num_classes),
                                           **dtypes),
      modality_dropout=modality_dropout, missing=missing,
      unimodal_heads=unimodal_heads, **dtypes)


def build_contrastive(*, modalities: Sequence[str],
                      encoders: Mapping[str, Mapping], embed_dim: int = 128,
                      objective: str = "softmax",
                      locked: Sequence[str] = (),
                      projections: Mapping[str, str] | None = None,
                      dtype="float32", param_dtype="float32",
                      remat: str = NO_REMAT,
                      scan_layers: bool = False) -> ContrastiveModel:
  """`ContrastiveModel` from names.

  Args:
    modalities: one tower each.
    encoders: per modality an encoder spec (see `build_encoders`).
    embed_dim, objective, locked, projections: as `ContrastiveModel`.
    dtype, param_dtype, remat, scan_layers: as `build_classifier`'s.
  """
  options = model_options(dtype, param_dtype, remat, scan_layers)
  encoder_modules, frontends = build_encoders(encoders, modalities,
                                              options=options)
  return ContrastiveModel(modalities=tuple(modalities),
                          encoders=encoder_modules, frontends=frontends,
                          embed_dim=embed_dim, objective=objective,
                          locked=tuple(locked), projections=projections,
                          dtype=options["dtype"],
                          param_dtype=options["param_dtype"])


def build_generative(*, modalities: Sequence[str],
                     encoders: Mapping[str, Mapping], decoder: Mapping,
                     conditioning: str = "prefix", dtype="float32",
                     param_dtype="float32", remat: str = NO_REMAT,
                     scan_layers: bool = False,
                     **kwargs) -> GenerativeModel:
  """`GenerativeModel` from names.

  Args:
    modalities: the media modalities (may be empty: a text-only LM).
    encoders: per modality an encoder spec (see `build_encoders`).
    decoder: `TextDecoder`'s keyword arguments (vocab_size, width,
      num_layers, num_heads, mlp_dim, max_length, positions, dropout);
      `cross_attention` follows `conditioning`.
    conditioning: a `mmjax.models.generative.CONDITIONINGS` entry.
    dtype, param_dtype, remat, scan_layers: as `build_classifier`'s.
    **kwargs: the rest of `GenerativeModel`'s fields (bos_id, num_latents,
      resampler_layers, xattn_every, num_heads).
  """
  options = model_options(dtype, param_dtype, remat, scan_layers)
  encoder_modules, frontends = build_encoders(encoders, modalities,
                                              options=options)
  dtypes = dict(dtype=options["dtype"], param_dtype=options["param_dtype"])
  text_decoder = TextDecoder(**{
      **dict(decoder), "cross_attention": conditioning == "cross_attention",
      "remat": remat, **dtypes})
  return GenerativeModel(modalities=tuple(modalities),
                         encoders=encoder_modules, frontends=frontends,
                         decoder=text_decoder, conditioning=conditioning,
                         **kwargs, **dtypes)


def _config_options(config) -> dict:
  """dtype, param_dtype, remat and scan_layers of a config (`set_training`'s
  keys; a config without them gets float32, no remat, no scan)."""
  return dict(dtype=config.get("dtype", "float32"),
              param_dtype=config.get("param_dtype", "float32"),
              remat=config.get("remat", NO_REMAT),
              scan_layers=config.get("scan_layers", False))


def classifier_from_config(config) -> MultimodalClassifier:
  """The classifier of `config.modalities` and `config.model` (encoders,
  fusion, num_classes, head_hidden, fusion_kwargs, modality_dropout,
  missing, optional unimodal_heads), with the config's dtype, param_dtype,
  remat and scan_layers."""
  return build_classifier(
      modalities=tuple(config.modalities),
      encoders=_plain(config.model.encoders),
      fusion=config.model.fusion,
      num_classes=config.model.num_classes,
      head_hidden=tuple(config.model.head_hidden),
      fusion_kwargs=_plain(config.model.fusion_kwargs),
      modality_dropout=_plain(config.model.modality_dropout),
      missing=config.model.missing,
      unimodal_heads=config.model.get("unimodal_heads", "none"),
      **_config_options(config))


def contrastive_from_config(config) -> ContrastiveModel:
  """The towers of `config.modalities` and `config.model` (encoders,
  embed_dim, optional projections), the objective's family ("softmax" of "softmax_ring"), and as
  `locked` every modality whose whole encoder `config.frozen` matches (a
  regex over parameter paths, e.g. "tower_text/encoder/.*"), with the
  config's dtype, param_dtype, remat and scan_layers."""
  # A tower whose whole encoder matches `frozen` also skips its backward.
  frozen = re.compile(config.frozen) if config.get("frozen") else None
  return build_contrastive(
      modalities=tuple(config.modalities),
      encoders=_plain(config.model.encoders),
      embed_dim=config.model.embed_dim,
      projections=_plain(config.model.get("projections")),
      objective=config.objective.split("_")[0],
      locked=tuple(m for m in config.modalities
                   if frozen and frozen.fullmatch(f"tower_{m}/encoder/")),
      **_config_options(config))


def generative_from_config(config) -> GenerativeModel:
  """The generative model of `config.modalities` and `config.model`
  (encoders, decoder, conditioning and `GenerativeModel`'s other fields),
  with the config's dtype, param_dtype, remat and scan_layers."""
  model = _plain(config.model)
  for key in ("init", "num_classes"):  # not the model's
    model.pop(key, None)
  return build_generative(modalities=tuple(config.modalities), **model,
                          **_config_options(config))


MODEL_FACTORIES = {"supervised": classifier_from_config,
                   "captioning": generative_from_config,
                   "coca": coca_from_config}


def build_model(config):
  """The classifier (objective "supervised"), the generative model
  ("captioning"), CoCa ("coca") or the contrastive towers (every other
  objective)."""
  return MODEL_FACTORIES.get(config.objective,
                             contrastive_from_config)(config)
