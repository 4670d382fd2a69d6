"""Text generation from media: captioning and question answering.

`GenerativeModel` encodes each modality to tokens, projects them to the
text decoder's width and conditions a `mmjax.models.decoder.TextDecoder` on
them in one of three ways (`conditioning`):

  prefix           PaLI / PaliGemma (Chen et al., "PaLI: A Jointly-Scaled
                   Multilingual Language-Image Model", ICLR 2023; Beyer et
                   al., "PaliGemma", 2024): the media tokens, then the
                   prompt, form a prefix with full attention among
                   themselves; the answer attends causally to everything
                   before it.
  cross_attention  the captioning transformer (Vaswani et al. 2017's
                   encoder-decoder; CoCa's multimodal decoder): every
                   decoder block cross-attends to the media tokens; the
                   prompt is a bidirectional text prefix.
  flamingo         Alayrac et al., "Flamingo: a Visual Language Model for
                   Few-Shot Learning", NeurIPS 2022: a Perceiver resampler
                   turns the media tokens into `num_latents` latents, and a
                   gated xattn-dense block (tanh gates initialised at 0)
                   before every `xattn_every`-th block of a language model
                   lets the text attend to them. The decoder's parameters
                   are the language model's alone ("decoder/..."; the gated
                   blocks are "gated_xattn_<i>", the resampler "resampler"),
                   so a text-only LM trained by mmjax loads into it and is
                   frozen with `config.frozen = "decoder/.*"`; at
                   initialisation the logits equal the LM's exactly.

Batches: the modalities with their "mask/<m>" [B], the target "text" int32
[B, L] (token ids ending in the end token, then padding id 0) and an optional
"prompt" int32 [B, Lp] (e.g. the question; padding 0). Training is teacher
forcing: the decoder reads [bos] + text[:-1] and its logits [B, L, V] predict
text (objective "captioning"). `generate` decodes with the KV cache.
"""

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import decoding
from mmjax.models.decoder import TextDecoder
from mmjax.models.fusion.perceiver import (GatedCrossAttentionDense,
                                           PerceiverResampler)
from mmjax.models.layers import zero_masked
from mmjax.models.multimodal import modality_input
from mmjax.models.precision import Dtype, to_compute

CONDITIONINGS = ("prefix", "cross_attention", "flamingo")
PAD_ID = 0


class GenerativeModel(nn.Module):
  """Encoders, media projection and a text decoder (module docstring).

  Built from modules, e.g.

    GenerativeModel(modalities=("image",), encoders={"image": ViT(...)},
                    decoder=TextDecoder(vocab_size=259, width=128, ...),
                    conditioning="prefix")

  (`mmjax.models.factory.build_generative` builds it from config names).

  Submodules: "encoder_<m>", "frontend_<m>", "project_<m>" (Dense D_m -> D),
  "modality_embedding" [M, D] (added to each modality's tokens, modalities in
  sorted order), "decoder"; with flamingo "resampler" and
  "gated_xattn_<i>".

  Attributes:
    modalities: the media modalities (batch keys); none makes a text-only
      language model (e.g. the LM a Flamingo model later freezes).
    encoders: per modality an encoder, input [B, ...] -> tokens [B, N_m, D_m].
    decoder: the `TextDecoder`; its `cross_attention` must be True exactly
      for conditioning "cross_attention".
    conditioning: a `CONDITIONINGS` entry.
    frontends: optional per-modality front ends (waveform -> log-mel).
    bos_id: the token that starts every decoded sequence.
    num_latents, resampler_layers: the Perceiver resampler's (flamingo).
    xattn_every: a gated block before every n-th decoder block (flamingo;
      Flamingo-3B/9B/80B use 1, 4 and 7).
    registers: learned tokens [R, D] appended to every example's media
      (prefix and cross_attention), always valid: the registers of Darcet
      et al., "Vision Transformers Need Registers", ICLR 2024, here as
      attention sinks (Xiao et al., "Efficient Streaming Language Models
      with Attention Sinks", ICLR 2024; PyTorch's `add_bias_kv`). Softmax
      attention normalises its weights over the media: a query that picks
      out the tokens showing one digit reads the same mixture whether one or
      two show it, and some mixture even when none does, unless another
      token keeps a share of the weight. A register keeps it whatever the
      image, which is what counting (digits_qa's "how many 4s?") and
      noticing an absence need. 0: none.
    num_heads: heads of the resampler and gated blocks.
    dtype, param_dtype: compute and parameter dtypes.
  """
  modalities: Sequence[str]
  encoders: Mapping[str, nn.Module]
  decoder: TextDecoder
  conditioning: str = "prefix"
  frontends: Mapping[str, nn.Module] | None = None
  bos_id: int = 1
  num_latents: int = 16
  resampler_layers: int = 2
  xattn_every: int = 1
  registers: int = 0
  num_heads: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.conditioning not in CONDITIONINGS:
      raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got "
                       f"{self.conditioning!r}")
    if self.decoder.cross_attention != (self.conditioning == "cross_attention"):
      raise ValueError("the decoder's cross_attention must be True exactly "
                       "for conditioning 'cross_attention'")
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    names = sorted(self.modalities)
    width = self.decoder.width
    self.encoder = {m: self.encoders[m].clone(parent=None, name=None)
                    for m in names}
    frontends = self.frontends or {}
    self.frontend = {m: frontends[m].clone(parent=None, name=None)
                     for m in names if frontends.get(m) is not None}
    self.project = {m: nn.Dense(width, **precision) for m in names}
    if names:  # (orbax saves no zero-size arrays)
      self.modality_embedding = self.param(
          "modality_embedding_table", nn.initializers.normal(0.02),
          (len(names), width), self.param_dtype)
    if self.registers:
      if self.conditioning == "flamingo" or not names:
        raise ValueError("registers need media and conditioning 'prefix' "
                         "or 'cross_attention'")
      self.register_tokens = self.param(
          "register_tokens", nn.initializers.normal(0.02),
          (self.registers, width), self.param_dtype)
    if self.conditioning == "flamingo":
      self.resampler = PerceiverResampler(
          num_latents=self.num_latents, num_layers=self.resampler_layers,
          num_heads=self.num_heads, max_frames=len(names), **precision)
      self.gated_xattn = {
          str(i): GatedCrossAttentionDense(num_heads=self.num_heads,
                                           **precision)
          for i in range(0, self.decoder.num_layers, self.xattn_every)}

  # ------------------------------------------------------------- media ---

  def encode(self, batch: Mapping, train: bool = False):
    """The media the decoder is conditioned on.

    Returns (media [B, M, D], valid [B, M] bool): every modality's projected
    tokens plus its modality embedding, concatenated in sorted modality
    order, zero and invalid where the modality is missing, then the
    `registers` (prefix and cross_attention); with flamingo the resampler's
    latents [B, L, D], valid where the example has any modality.
    """
    names = sorted(self.modalities)
    if not names:  # a text-only language model
      size = batch["text"].shape[0]
      return (jnp.zeros((size, 0, self.decoder.width), self.dtype),
              jnp.zeros((size, 0), bool))
    tokens, valid = [], []
    for i, m in enumerate(names):
      x = modality_input(batch, m)
      if m in self.frontend:
        x = self.frontend[m](x)
      x = self.encoder[m](to_compute(x, self.dtype), train=train)
      x = self.project[m](x) + self.modality_embedding[i].astype(self.dtype)
      present = batch[f"mask/{m}"].astype(bool)
      tokens.append(zero_masked(x, present))
      valid.append(jnp.broadcast_to(present[:, None], x.shape[:2]))
    if self.conditioning != "flamingo":
      if self.registers:
        size = tokens[0].shape[0]
        tokens.append(jnp.broadcast_to(
            self.register_tokens.astype(self.dtype),
            (size,) + self.register_tokens.shape))
        valid.append(jnp.ones((size, self.registers), bool))
      return jnp.concatenate(tokens, 1), jnp.concatenate(valid, 1)
    length = max(t.shape[1] for t in tokens)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, length - x.shape[1]))
                            + ((0, 0),) * (x.ndim - 2))
    latents = self.resampler(jnp.stack([pad(t) for t in tokens], 1),
                             jnp.concatenate([pad(v) for v in valid], 1),
                             train=train)
    any_present = jnp.any(jnp.stack([v[:, 0] for v in valid], 1), 1)
    return latents, jnp.broadcast_to(any_present[:, None], latents.shape[:2])

  # ------------------------------------------------------------- text ----

  def decode(self, tokens, media, media_valid, *, prompt=None,
             start: bool = True, full_attention_length: int | None = None,
             decode: bool = False, train: bool = False):
    """Logits [B, T, V] of `tokens` [B, T] given the media.

    start: the call begins the sequence: it places the media prefix
      (conditioning "prefix") and `prompt` [B, Lp] before `tokens`. Later
      calls while decoding (`start=False`) feed the next tokens only and
      must pass the first call's `full_attention_length`.
    """
    if full_attention_length is None:
      full_attention_length = prefix_length(self.conditioning, media, prompt)
    kwargs = {}
    if start and prompt is not None:
      kwargs["token_valid"] = jnp.concatenate(
          [prompt != PAD_ID, jnp.ones(tokens.shape, bool)], 1)
      tokens = jnp.concatenate([prompt, tokens], 1)
    if self.conditioning == "prefix" and start:
      kwargs.update(prefix=media, prefix_valid=media_valid)
    elif self.conditioning == "cross_attention":
      kwargs.update(context=media, context_valid=media_valid)
    elif self.conditioning == "flamingo":
      kwargs.update(gated_blocks={int(i): b for i, b in
                                  self.gated_xattn.items()},
                    gated_context=media, gated_valid=media_valid)
    logits = self.decoder(tokens, full_attention_length=full_attention_length,
                          decode=decode, train=train, **kwargs)
    if start and prompt is not None:
      logits = logits[:, prompt.shape[1]:]
    return logits

  def __call__(self, batch: Mapping, *, train: bool = False) -> dict:
    """Teacher forcing: {"logits": float32 [B, L, V]} predicting
    batch["text"] [B, L] from [bos] + text[:-1]."""
    media, valid = self.encode(batch, train=train)
    text = batch["text"]
    inputs = jnp.concatenate(
        [jnp.full(text.shape[:1] + (1,), self.bos_id, text.dtype),
         text[:, :-1]], 1)
    return {"logits": self.decode(inputs, media, valid,
                                  prompt=batch.get("prompt"), train=train)}


def prefix_length(conditioning: str, media, prompt) -> int:
  """The positions with full attention: the media tokens [B, M, D] where
  they are the prefix (conditioning "prefix"), then the prompt [B, Lp]."""
  media_tokens = media.shape[1] if conditioning == "prefix" else 0
  return media_tokens + (0 if prompt is None else prompt.shape[1])


DECODING_METHODS = ("greedy", "beam", "sample")


def generate(model: GenerativeModel, variables: Mapping, batch: Mapping, *,
             max_new_tokens: int, eos_id: int, method: str = "greedy",
             rng: jax.Array | None = None, beam_size: int = 4,
             length_penalty: float = 0.6, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0) -> jnp.ndarray:
  """Generated token ids int32 [B, max_new_tokens] (padding after the end
  token), decoding with the KV cache (`mmjax.decoding`).

  The media are encoded once; one prefill call runs the prefix, the prompt
  and the bos token; then each step feeds one token. Beam search tiles the
  cache and the media over the beams. `variables`: {"params", and
  "batch_stats" if the encoders have them}; the decoder's `max_length` must
  hold the prefix, the prompt and max_new_tokens + 1 tokens.
  """
  media, valid = model.apply(variables, batch, method=model.encode)
  prompt = batch.get("prompt")
  batch_size = media.shape[0]
  full_length = prefix_length(model.conditioning, media, prompt)
  needed = full_length + max_new_tokens + 1
  if needed > model.decoder.max_length:
    raise ValueError(f"decoding needs {needed} positions; the decoder's "
                     f"max_length is {model.decoder.max_length}")
  bos = jnp.full((batch_size, 1), model.bos_id, jnp.int32)
  logits, variables_out = model.apply(
      variables, bos, media, valid, prompt=prompt, decode=True,
      method=model.decode, mutable=["cache"])
  state = {"cache": variables_out["cache"], "media": media, "valid": valid}

  def step_fn(state, tokens):
    logits, updated = model.apply(
        {**variables, "cache": state["cache"]}, tokens[:, None],
        state["media"], state["valid"], start=False,
        full_attention_length=full_length, decode=True, method=model.decode,
        mutable=["cache"])
    return logits[:, -1], {**state, "cache": updated["cache"]}

  common = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=PAD_ID)
  first = logits[:, -1]
  if method == "greedy":
    return decoding.greedy(step_fn, first, state, **common)
  if method == "beam":
    return decoding.beam_search(step_fn, first, state, beam_size=beam_size,
                                length_penalty=length_penalty, **common)[0]
  if method == "sample":
    return decoding.sample(step_fn, first, state,
                           jax.random.PRNGKey(0) if rng is None else rng,
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           **common)
  raise ValueError(f"unknown decoding method {method!r} (known: "
                   f"{', '.join(DECODING_METHODS)})")
