"""CoCa: a contrastive captioner (image encoder, unimodal and multimodal
text decoders, attentional poolers).

Yu, Wang, Vasudevan, Yeung, Seyedhosseini and Wu, "CoCa: Contrastive
Captioners are Image-Text Foundation Models", TMLR 2022 (Section 3.2,
Figure 2 and its pseudo-code):

  img_feature = encoder(image)                           [B, N, D_img]
  con_feature = attentional_pooling(img_feature, 1 query)        [B, 1, D]
  cap_feature = attentional_pooling(img_feature, n_query)        [B, n_q, D]
  unimodal_out = unimodal_decoder([bos] + text + [CLS])    [B, L + 2, D]
                 (causal self-attention only)
  multimodal_out = multimodal_decoder(unimodal_out[:, :L],      [B, L, D]
                 cross_attention=cap_feature)   (the outputs of [bos] +
                                                 text[:-1])
  text embedding  = LN(unimodal_out)[:, -1]   (the CLS position)
  logits          = LN(multimodal_out) @ E^T  (tied token embeddings E)

  attentional_pooling(x, queries) = LN(MultiHeadAttention(q=queries, kv=x))

and the loss (Section 3.2) L = lambda_con L_con + lambda_cap L_cap with the
paper's lambda_cap = 2, lambda_con = 1 (`coca_objective`): L_con the
symmetric softmax (CLIP) loss between the projected, L2-normalised image and
text embeddings, L_cap the next-token cross-entropy of the multimodal
decoder's logits (Section 3.1).

Design choices where the paper leaves room:

  CLS position  The [CLS] token (a learned vector "cls_token" [D], not a
                vocabulary entry) is appended after the last position of the
                right-padded sequence, as the paper's pseudo-code does
                (`ids = concat(text.ids, cls_token_id)`). The unimodal
                decoder reads [bos] + text (L + 1 tokens) + [CLS]: the
                multimodal decoder takes the first L outputs ([bos] +
                text[:-1], teacher forcing) and the CLS reads every token of
                the text, its end token included, wherever the padding
                starts (with [bos] + text[:-1] alone, a text that fills all
                L positions would lose its last token and a shorter one
                would not). It attends, as the last position of a causal
                sequence, to every position whose token is not padding
                (`pad_id` tokens are invalid keys for every query; position
                0, the bos token, is always valid). It gets no position
                embedding: its learned vector is its position, so the text
                embedding is the same however far the batch is padded
                (tested). The position table needs `max_length` >= L + 1.
                No text position attends to the CLS or to text[-1] (both
                come later), so the logits are those of the sequence without
                them, and decoding (which never feeds the CLS) gives the
                teacher-forced logits.
  poolers       Two `AttentionalPooler`s over the image tokens, queries of
                the decoder's width D (keys and values are projected from
                D_img by the attention itself): "caption_pooler" with
                `num_queries` queries (paper: 256) is the multimodal decoder's
                cross-attention context; "contrastive_pooler" with
                `contrastive_queries` (paper: 1; more are mean-pooled) gives
                the image embedding after the projection "project_image".
  projections   "project_image" and "project_text" are bias-free linear maps
                D -> embed_dim (CLIP's projection matrices), then L2
                normalisation.
  temperature   "log_scale" is learned, initialised at log(1 / 0.07) as in
                `ContrastiveModel` with objective "softmax"; the softmax loss
                has no bias, so the outputs' "bias" is the constant 0 (no
                parameter that the loss could never train).
  padding       Padding input tokens are invalid keys in both decoders, in
                teacher forcing and while decoding, so cached decoding equals
                the full recomputation at every position.

Decoding: `CoCa` has `GenerativeModel`'s decoding interface (`encode`,
`decode`, `bos_id`, `conditioning`, `decoder.max_length`), so
`mmjax.models.generative.generate` decodes captions with the KV cache of
every unimodal and multimodal layer (the CLS is not used). CoCa takes no
prompt.

Parameters: "encoder_image" (and "frontend_image"), "caption_pooler",
"contrastive_pooler", "project_image", "project_text", "log_scale" and
"text_decoder" with "token_embeddings", "position_embeddings", "cls_token",
"unimodal_<i>", "multimodal_<i>" (`mmjax.models.decoder.DecoderBlock`s),
"norm_cls" and "norm_out".
"""

from collections.abc import Mapping
from typing import NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from mmjax import objectives
from mmjax.models.contrastive import INITIAL_LOGIT_PARAMS
from mmjax.models.decoder import DecoderBlock
from mmjax.models.layers import (NO_REMAT, attention, key_mask, pool_tokens,
                                 remat, zero_masked)
from mmjax.models.multimodal import modality_input
from mmjax.models.precision import Dtype, to_compute, to_float32


def _normalize(z: jnp.ndarray) -> jnp.ndarray:
  """Rows of z [B, D] in float32 scaled to unit L2 norm."""
  z = z.astype(jnp.float32)
  return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


class AttentionalPooler(nn.Module):
  """CoCa's attentional pooling: tokens [B, N, D_in] -> [B, Q, features].

  One multi-head attention layer whose Q learned queries ("queries"
  [Q, features]) attend to the tokens (keys and values projected from D_in),
  then LayerNorm ("norm"): `layer_norm(multihead_attention(features,
  query))` of Yu et al. 2022's pseudo-code. Float32 softmax; computes in
  `dtype`, parameters in `param_dtype`.
  """
  num_queries: int
  features: int
  num_heads: int
  layer_norm_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray,
               valid: jnp.ndarray | None = None) -> jnp.ndarray:
    """tokens [B, N, D_in], valid [B, N] bool (default all) ->
    [B, num_queries, features] in `dtype`."""
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    queries = self.param("queries", nn.initializers.normal(0.02),
                         (self.num_queries, self.features), self.param_dtype)
    queries = jnp.broadcast_to(queries.astype(self.dtype),
                               (tokens.shape[0],) + queries.shape)
    mask = None if valid is None else key_mask(valid, self.num_queries,
                                               tokens.shape[1])
    pooled = attention(self.num_heads, qkv_features=self.features,
                       out_features=self.features, name="attention",
                       **precision)(queries, tokens, mask=mask)
    return nn.LayerNorm(self.layer_norm_epsilon, name="norm",
                        **precision)(pooled)


class CoCaTextDecoder(nn.Module):
  """CoCa's text side: unimodal then multimodal `DecoderBlock`s.

  ids [B, T] -> (logits float32 [B, T, V], CLS feature [B, D] or None).
  Pre-LayerNorm blocks with learned absolute positions
  ("position_embeddings" [max_length, D]) and tied embeddings
  ("token_embeddings" [V, D]); the `unimodal_layers` blocks have causal
  self-attention only, the `multimodal_layers` blocks also cross-attend to
  the context (the caption pooler's queries). KV cache as
  `mmjax.models.decoder.TextDecoder`'s (`decode=True`, collection "cache",
  positions continuing from the cache's "position").

  Attributes: as `CoCa`'s of the same names.
  """
  vocab_size: int
  width: int
  unimodal_layers: int
  multimodal_layers: int
  num_heads: int
  mlp_dim: int
  max_length: int = 128
  dropout: float = 0.0
  layer_norm_epsilon: float = 1e-5
  remat: str = NO_REMAT
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, context: jnp.ndarray,
               context_valid: jnp.ndarray, *,
               token_valid: jnp.ndarray | None = None, cls: bool = False,
               decode: bool = False, train: bool = False):
    """Next-token logits, and with `cls` the CLS feature.

    Args:
      tokens: int [B, T] token ids (the decoder's input).
      context, context_valid: [B, M, D] and bool [B, M], the multimodal
        blocks' cross-attention keys.
      token_valid: bool [B, T]; False tokens are never attended to (padding).
      cls: teacher forcing with the CLS: `tokens` is [bos] + text (T = L + 1);
        the learned CLS token is appended after them (no position
        embedding; it attends to every valid token: module docstring of
        `mmjax.models.coca`), LN(its unimodal output) [B, D] is returned,
        and the multimodal blocks run on the first T - 1 = L positions only
        (the last token is a target, read by the CLS alone). Not while
        decoding.
      decode: use and extend the KV cache.
      train: dropout.

    Returns:
      (float32 logits [B, T, V], or [B, T - 1, V] with `cls`; the CLS
      feature [B, D] in `dtype`, or None).
    """
    if cls and decode:
      raise ValueError("the CLS token is not used while decoding")
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embed = nn.Embed(self.vocab_size, self.width,
                     embedding_init=nn.initializers.normal(0.02),
                     name="token_embeddings", **precision)
    x = embed(tokens)
    batch, length = tokens.shape
    valid = (jnp.ones(tokens.shape, bool) if token_valid is None
             else token_valid.astype(bool))
    start = 0
    if decode:  # positions continue where the cache stopped
      index = self.variable("cache", "position",
                            lambda: jnp.zeros((), jnp.int32))
      start = index.value
      index.value = start + length
    elif length > self.max_length:
      raise ValueError(f"CoCa's decoder input of {length} positions "
                       f"exceeds its max_length={self.max_length} (teacher "
                       "forcing reads [bos] + text: L + 1 positions)")
    positions = start + jnp.arange(length)
    table = self.param("position_embeddings", nn.initializers.normal(0.01),
                       (self.max_length, self.width), self.param_dtype)
    x = x + jnp.take(table, positions, axis=0).astype(x.dtype)[None]
    if cls:  # the last position; no position embedding (module docstring)
      token = self.param("cls_token", nn.initializers.normal(0.02),
                         (self.width,), self.param_dtype)
      x = jnp.concatenate([x, jnp.broadcast_to(token.astype(x.dtype),
                                               (batch, 1, self.width))], 1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    # No rematerialisation while decoding (the cache is written in place).
    block = DecoderBlock if decode else remat(DecoderBlock, self.remat)

    def layer(name: str, cross_attention: bool) -> nn.Module:
      return block(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                   max_length=self.max_length, positions="learned",
                   dropout=self.dropout,
                   layer_norm_epsilon=self.layer_norm_epsilon,
                   cross_attention=cross_attention, decode=decode,
                   name=name, **precision)

    unimodal_positions, unimodal_valid = positions, valid
    if cls:
      unimodal_positions = jnp.arange(length + 1)
      unimodal_valid = jnp.concatenate([valid, jnp.ones((batch, 1), bool)], 1)
    for i in range(self.unimodal_layers):
      x = layer(f"unimodal_{i}", False)(x, unimodal_positions,
                                        unimodal_valid, None, None, train)
    cls_feature = None
    if cls:  # the CLS reads all T tokens; the multimodal decoder T - 1
      cls_feature = nn.LayerNorm(self.layer_norm_epsilon, name="norm_cls",
                                 **precision)(x[:, -1])
      x, positions, valid = x[:, :-2], positions[:-1], valid[:, :-1]
    for i in range(self.multimodal_layers):
      x = layer(f"multimodal_{i}", True)(x, positions, valid, context,
                                         context_valid, train)
    x = nn.LayerNorm(self.layer_norm_epsilon, name="norm_out", **precision)(x)
    return embed.attend(x).astype(jnp.float32), cls_feature


class DecoderSize(NamedTuple):
  """What `generate` reads of a model's `decoder` (`max_length`)."""
  vocab_size: int
  width: int
  max_length: int


class CoCa(nn.Module):
  """The contrastive captioner (module docstring): batch -> outputs dict.

  Built from modules, e.g.

    CoCa(image_encoder=ViT(...), vocab_size=32000, width=512,
         unimodal_layers=6, multimodal_layers=6, num_heads=8, mlp_dim=2048,
         embed_dim=512)

  (`build_coca` builds it from plain specs). `__call__` returns
  {"logits": float32 [B, L, V] predicting batch["text"] [B, L] from
  [bos] + text[:-1], "embedding/image", "embedding/text": float32
  [B, embed_dim] L2-normalised, "log_scale": [], "bias": [] (0)}: the
  inputs of `coca_objective`, and of `objectives.captioning` and
  `objectives.contrastive("softmax")` alone. The batch holds "image"
  [B, H, W, C], "text" int32 [B, L] (ids ending in the end token, then
  `pad_id`) and optionally "mask/image" [B] (a missing image gives the
  multimodal decoder no context; its embedding is still computed).

  Attributes:
    image_encoder: image [B, H, W, C] -> tokens [B, N, D_img]; named
      "encoder_image".
    vocab_size: V.
    width: the text decoders' and poolers' width D.
    unimodal_layers, multimodal_layers: decoder blocks of each kind (paper:
      half and half).
    num_heads: attention heads of the decoders and poolers.
    mlp_dim: feed-forward width of the decoder blocks (4 D).
    max_length: positions of the table and the KV cache: at least L + 1
      for text of L tokens (teacher forcing reads [bos] + text), and
      max_new_tokens + 1 for `generate`.
    embed_dim: width of the contrastive embeddings.
    num_queries: the caption pooler's queries (paper: 256).
    contrastive_queries: the contrastive pooler's (paper: 1).
    frontend: optional module before the encoder ("frontend_image").
    bos_id: the token that starts every decoder input.
    pad_id: the padding id of the text (invalid as an attention key).
    dropout: the decoders' dropout (embeddings, attention, residuals).
    layer_norm_epsilon: of the decoders and poolers.
    remat: a `mmjax.models.layers.REMAT_POLICIES` name for the decoder
      blocks.
    dtype, param_dtype: compute and parameter dtypes; outputs are float32.
  """
  image_encoder: nn.Module
  vocab_size: int
  width: int
  unimodal_layers: int
  multimodal_layers: int
  num_heads: int
  mlp_dim: int
  max_length: int = 128
  embed_dim: int = 128
  num_queries: int = 256
  contrastive_queries: int = 1
  frontend: nn.Module | None = None
  bos_id: int = 1
  pad_id: int = 0
  dropout: float = 0.0
  layer_norm_epsilon: float = 1e-5
  remat: str = NO_REMAT
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  # `generate` conditions every step on the pooled queries by
  # cross-attention: no media prefix (`generative.prefix_length` is 0).
  conditioning = "cross_attention"

  @property
  def decoder(self) -> DecoderSize:
    """The text decoder's sizes (`generate` checks `max_length`)."""
    return DecoderSize(self.vocab_size, self.width, self.max_length)

  def setup(self):
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder_image = self.image_encoder.clone(parent=None, name=None)
    if self.frontend is not None:
      self.frontend_image = self.frontend.clone(parent=None, name=None)
    pooler = lambda queries: AttentionalPooler(
        queries, self.width, self.num_heads, self.layer_norm_epsilon,
        **precision)
    self.caption_pooler = pooler(self.num_queries)
    self.contrastive_pooler = pooler(self.contrastive_queries)
    self.project_image = nn.Dense(self.embed_dim, use_bias=False, **precision)
    self.project_text = nn.Dense(self.embed_dim, use_bias=False, **precision)
    self.text_decoder = CoCaTextDecoder(
        self.vocab_size, self.width, self.unimodal_layers,
        self.multimodal_layers, self.num_heads, self.mlp_dim,
        self.max_length, self.dropout, self.layer_norm_epsilon, self.remat,
        **precision)
    self.log_scale = self.param(
        "log_scale", nn.initializers.constant(INITIAL_LOGIT_PARAMS[
            "softmax"][0]), (), self.param_dtype)

  # ------------------------------------------------------------- image ---

  def _image_tokens(self, batch: Mapping, train: bool) -> jnp.ndarray:
    """The encoder's tokens [B, N, D_img] of batch["image"]."""
    x = modality_input(batch, "image")
    if self.frontend is not None:
      x = self.frontend_image(x)
    return self.encoder_image(to_compute(x, self.dtype), train=train)

  def _caption_context(self, tokens, batch: Mapping):
    """The caption pooler's queries [B, Q, D] of the image tokens, zero and
    invalid [B, Q] where "mask/image" says the image is missing."""
    pooled = self.caption_pooler(tokens)
    present = batch.get("mask/image")
    if present is None:
      return pooled, jnp.ones(pooled.shape[:2], bool)
    present = present.astype(bool)
    return (zero_masked(pooled, present),
            jnp.broadcast_to(present[:, None], pooled.shape[:2]))

  def encode(self, batch: Mapping, train: bool = False):
    """The multimodal decoder's context: (media [B, num_queries, D], valid
    [B, num_queries] bool), the caption pooler's output."""
    return self._caption_context(self._image_tokens(batch, train), batch)

  # -------------------------------------------------------------- text ---

  def _token_valid(self, tokens: jnp.ndarray, start: bool) -> jnp.ndarray:
    """bool [B, T]: not padding; a sequence's first token (bos) always."""
    valid = tokens != self.pad_id
    return valid.at[:, 0].set(True) if start else valid

  def decode(self, tokens, media, media_valid, *, prompt=None,
             start: bool = True, full_attention_length: int | None = None,
             decode: bool = False, train: bool = False):
    """Logits float32 [B, T, V] of `tokens` [B, T] given the pooled image
    queries (`encode`), as `GenerativeModel.decode` (no prompt: CoCa is a
    captioner; `full_attention_length` must be None or 0). start: the call
    begins the sequence (its first token is bos); later calls while
    decoding (`start=False`) feed the next tokens."""
    if prompt is not None:
      raise ValueError("CoCa takes no prompt")
    if full_attention_length:
      raise ValueError("CoCa's decoder is causal: full_attention_length "
                       f"must be 0, got {full_attention_length}")
    logits, _ = self.text_decoder(
        tokens, media, media_valid,
        token_valid=self._token_valid(tokens, start), decode=decode,
        train=train)
    return logits

  def __call__(self, batch: Mapping, *, train: bool = False) -> dict:
    """Teacher forcing and both embeddings (class docstring)."""
    if batch.get("prompt") is not None:
      raise ValueError("CoCa takes no prompt")
    tokens = self._image_tokens(batch, train)
    media, media_valid = self._caption_context(tokens, batch)
    image = self.project_image(pool_tokens(self.contrastive_pooler(tokens)))
    text = batch["text"]
    inputs = jnp.concatenate(  # [bos] + text: text[-1] is read by the CLS
        [jnp.full(text.shape[:1] + (1,), self.bos_id, text.dtype), text], 1)
    logits, cls = self.text_decoder(
        inputs, media, media_valid, token_valid=self._token_valid(inputs,
                                                                  True),
        cls=True, train=train)
    return to_float32({
        "logits": logits, "embedding/image": _normalize(image),
        "embedding/text": _normalize(self.project_text(cls)),
        "log_scale": self.log_scale, "bias": jnp.zeros((), jnp.float32)})


# ------------------------------------------------------------ objective ---


def coca_objective(caption_weight: float = 2.0,
                   contrastive_weight: float = 1.0):
  """CoCa's loss (Yu et al. 2022, Section 3.2): outputs, batch -> (loss,
  metrics).

    L = contrastive_weight * L_con + caption_weight * L_cap

  L_con is `objectives.contrastive("softmax")` over ("embedding/image",
  "embedding/text") with "log_scale", L_cap is
  `objectives.captioning` of "logits" against batch["text"]; the
  paper's lambda_con = 1, lambda_cap = 2. A weight that is the number 0
  leaves its term out of the loss (its metrics are still reported), so the
  loss and gradients are then exactly the other objective's.

  Metrics: "loss", "contrastive/loss", "contrastive/accuracy" (in-batch
  image -> text top-1), "contrastive/scale", "caption/loss",
  "caption/token_accuracy", "caption/perplexity".

  The objective has `whole_batch = True` (the contrastive negatives are the
  whole batch), so gradient accumulation takes `mmjax.accumulate`'s GradCache
  path, and `cache_split` (`objectives.CacheSplit`): GradCache caches only
  the two embeddings and the log scale, scores L_con on them over the whole
  batch, and computes L_cap microbatch by microbatch in its second pass
  (each weighed by its share of the target tokens), so the [B, L, V]
  logits are never cached. The returned outputs are then those three.
  """
  if caption_weight == 0 and contrastive_weight == 0:
    raise ValueError("coca_objective needs a nonzero weight")
  contrastive = objectives.contrastive("softmax")
  pair = ("embedding/image", "embedding/text", "log_scale")

  def whole(outputs, batch):
    con_loss, con = contrastive({k: outputs[k] for k in pair}, batch)
    return contrastive_weight * con_loss, con

  def local(outputs, batch):
    cap_loss, cap = objectives.captioning(outputs, batch)
    return caption_weight * cap_loss, {
        "loss": cap_loss, "token_accuracy": cap["token_accuracy"]}

  def combine(whole_loss, con, local_loss, cap):
    terms = [x for w, x in ((contrastive_weight, whole_loss),
                            (caption_weight, local_loss)) if w != 0]
    loss = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return {"loss": loss, "contrastive/loss": con["loss"],
            "contrastive/accuracy": con["accuracy"],
            "contrastive/scale": con["scale"], "caption/loss": cap["loss"],
            "caption/token_accuracy": cap["token_accuracy"],
            "caption/perplexity": jnp.exp(cap["loss"])}

  def objective(outputs, batch: dict, weights=None):
    if weights is not None:
      raise ValueError("the coca objective takes no head weights")
    metrics = combine(*whole(outputs, batch), *local(outputs, batch))
    return metrics["loss"], metrics

  objective.whole_batch = True  # the negatives are the whole batch
  objective.cache_split = objectives.CacheSplit(
      cached=pair, whole=whole, local=local,
      local_weight=objectives.captioning.loss_weight, combine=combine)
  return objective


# -------------------------------------------------------------- factory ---


def build_coca(*, image_encoder: Mapping, vocab_size: int, width: int,
               unimodal_layers: int, multimodal_layers: int, num_heads: int,
               mlp_dim: int, dtype="float32", param_dtype="float32",
               remat: str = NO_REMAT, scan_layers: bool = False,
               **kwargs) -> CoCa:
  """`CoCa` from plain specs, as `mmjax.models.factory.build_generative`.

  Args:
    image_encoder: an encoder spec `{"name": <ENCODERS key>, **kwargs}` with
      an optional "frontend" spec (`factory.build_encoders`).
    vocab_size, width, unimodal_layers, multimodal_layers, num_heads,
      mlp_dim: as `CoCa`'s.
    dtype, param_dtype, remat, scan_layers: model-wide options
      (`factory.model_options`), passed to the encoder, front end and CoCa.
    **kwargs: the rest of `CoCa`'s fields (max_length, embed_dim,
      num_queries, contrastive_queries, bos_id, pad_id, dropout,
      layer_norm_epsilon).
  """
  from mmjax.models import factory  # pylint: disable=import-outside-toplevel
  options = factory.model_options(dtype, param_dtype, remat, scan_layers)
  encoders, frontends = factory.build_encoders(
      {"image": image_encoder}, ["image"], key="model.encoders",
      options=options)
  return CoCa(image_encoder=encoders["image"], frontend=frontends.get("image"),
              vocab_size=vocab_size, width=width,
              unimodal_layers=unimodal_layers,
              multimodal_layers=multimodal_layers, num_heads=num_heads,
              mlp_dim=mlp_dim, remat=remat, dtype=options["dtype"],
              param_dtype=options["param_dtype"], **kwargs)


def coca_from_config(config) -> CoCa:
  """CoCa of `config.model`: `encoders["image"]` and `CoCa`'s other fields
  (vocab_size, width, unimodal_layers, ...), with the config's dtype,
  param_dtype, remat and scan_layers (`factory.build_model`'s contract)."""
  # pylint: disable=import-outside-toplevel,protected-access
  from mmjax.models import factory
  model = factory._plain(config.model)
  for key in ("init", "num_classes"):  # not the model's
    model.pop(key, None)
  encoders = model.pop("encoders")
  return build_coca(image_encoder=encoders["image"], **model,
                    **factory._config_options(config))
