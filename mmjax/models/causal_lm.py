"""Pretrained causal language models as `TextDecoder`s, converted without torch.

`load_gpt2(directory)` reads a Hugging Face GPT-2-family checkpoint (Radford
et al., "Language Models are Unsupervised Multitask Learners", 2019): a
directory with `config.json` (model_type "gpt2") and `model.safetensors` (or
the shards of `model.safetensors.index.json`), tensors named as in
`GPT2LMHeadModel` ("transformer.h.0.attn.c_attn.weight", ..., "lm_head.weight")
or `GPT2Model` (no prefix). It returns `TextDecoder` keyword arguments and the
decoder's Flax parameters:

  kwargs, params = load_gpt2("path/to/gpt2")
  decoder = TextDecoder(**kwargs)
  logits = decoder.apply({"params": params}, ids)   # ids [B, T] -> [B, T, V]

with the data package's `HuggingFaceTokenizer(".../tokenizer.json", L)`.
Needs only `safetensors` (`pip install -e ".[text]"`); torch is never
imported. The logits match `GPT2LMHeadModel`'s to about 1e-6 in float32
(tests/test_causal_lm.py, also through the KV cache).

Mapping (D = n_embd, H = n_head, Dh = D / H; GPT-2's Conv1D weights are
[in, out] already, so no transposes):

  wte [V, D], wpe [n_positions, D]   token_embeddings/embedding,
                                     position_embeddings (max_length =
                                     n_positions, positions="learned")
  h.<i>.ln_1, ln_2, ln_f             layer_<i>/norm_attention, norm_mlp,
                                     norm_out {scale, bias}
  h.<i>.attn.c_attn [D, 3D]          layer_<i>/attention/{query,key,value}
                                     [D, H, Dh] (q, k, v in this order)
  h.<i>.attn.c_proj [D, D]           layer_<i>/attention/out [H, Dh, D]
  h.<i>.mlp.c_fc, c_proj             layer_<i>/mlp/dense_0, dense_1
  lm_head [V, D]                     tied to wte (TextDecoder's head is
                                     `embed.attend`); checked to equal it

activation_function "gelu_new", "gelu_pytorch_tanh" and "gelu_fast" (the
same tanh approximation) give activation="gelu_tanh", "gelu" (erf) "gelu".
GPT-2's dropout rates (embd_pdrop, attn_pdrop, resid_pdrop) are not part of
the architecture and not returned: pass TextDecoder's single `dropout`
yourself to fine-tune.

What TextDecoder cannot represent is refused with a ValueError naming the
config key or tensor: other activations, scale_attn_weights=False,
scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn (refused rather
than assumed equivalent), add_cross_attention (GPT-2's cross-attention
blocks have another layout), and an untied lm_head that differs from wte.
A checkpoint whose tensors do not fit the config's decoder (a missing,
left-over or wrongly shaped tensor) is refused naming the first such
parameter (`first_mismatch`, `check_fits`).

`load_llama(directory)` reads a Hugging Face Llama-family checkpoint
(Touvron et al., "LLaMA: Open and Efficient Foundation Language Models",
2023; model_type "llama": Llama 1-3, TinyLlama, ...) the same way
(`mmjax.models.llama_config` for its config.json). Mapping (torch Linear
weights [out, in] are transposed; G = num_key_value_heads):

  embed_tokens [V, D]                token_embeddings/embedding
  layers.<i>.input_layernorm,        layer_<i>/norm_attention, norm_mlp
    post_attention_layernorm, norm     and norm_out {scale} (RMSNorm)
  layers.<i>.self_attn.q_proj        layer_<i>/attention/query [D, H, Dh]
    k_proj, v_proj                     key, value [D, G, Dh]
    o_proj                             out [H, Dh, D]
  layers.<i>.mlp.gate_proj, up_proj,  layer_<i>/mlp/dense_0, dense_up,
    down_proj                          dense_1 (SwiGLU)
  lm_head [V, D]                     lm_head/kernel [D, V] (unless tied)

Hugging Face's Llama weights already hold queries and keys in the
half-split rotary layout of `mmjax.models.decoder.rotary`. The logits match
`LlamaForCausalLM`'s to about 1e-6 in float32 (tests/test_llama.py).
"""

from collections.abc import Mapping
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models.convert import (first_mismatch, hf_checkpoint_state,
                                  load_safetensors, param_shapes, split_heads,
                                  torch_dense)
from mmjax.models.decoder import TextDecoder
from mmjax.models.gpt2_config import read_gpt2_config
from mmjax.models.llama_config import read_llama_config

_PREFIX = "transformer."
# Non-parameter buffers of older GPT-2 checkpoints (the causal mask).
_BUFFERS = ("attn.bias", "attn.masked_bias")


def convert_gpt2(state: Mapping[str, Any], config: Mapping[str, Any],
                 dtype=np.float32) -> dict[str, Any]:
  """Hugging Face GPT-2 tensors -> `TextDecoder` parameters.

  Args:
    state: name -> array, `GPT2Model` names ("wte.weight",
      "h.0.attn.c_attn.weight", ...), or `GPT2LMHeadModel`'s with the
      "transformer." prefix (then other tensors outside it, heads such as
      "lm_head.weight" or a classifier's, are not part of the decoder).
    config: `TextDecoder` keyword arguments (see `gpt2_config`).
    dtype: dtype of the returned numpy arrays.

  Returns:
    The parameter tree (what goes under "params" in `TextDecoder.apply`).

  Raises:
    ValueError: a tensor the decoder needs is missing, a decoder tensor is
      left over (e.g. more layers than n_layer), or "lm_head.weight" is not
      the token embedding (an untied head). Shapes are not checked here
      (a tensor too narrow for n_head heads stays unsplit): `check_fits`.
  """
  head = state.get("lm_head.weight")
  if any(k.startswith(_PREFIX) for k in state):
    state = {k[len(_PREFIX):]: v for k, v in state.items()
             if k.startswith(_PREFIX)}
  else:
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}
  state = {k: v for k, v in state.items()
           if not any(k.startswith("h.") and k.endswith("." + b)
                      for b in _BUFFERS)}
  used = set()

  def get(name):
    if name not in state:
      raise ValueError(f"checkpoint lacks tensor {name!r} (needed by "
                       f"TextDecoder with num_layers={config['num_layers']})")
    used.add(name)
    return np.asarray(state[name], dtype)

  norm = lambda n: {"scale": get(f"{n}.weight"), "bias": get(f"{n}.bias")}
  dense = lambda n: {"kernel": get(f"{n}.weight"), "bias": get(f"{n}.bias")}
  heads = config["num_heads"]
  params = {"token_embeddings": {"embedding": get("wte.weight")},
            "position_embeddings": get("wpe.weight")}
  for i in range(config["num_layers"]):
    layer = f"h.{i}"
    norm_attention = norm(f"{layer}.ln_1")
    qkv = dense(f"{layer}.attn.c_attn")
    if qkv["kernel"].shape[-1] % 3 or qkv["bias"].shape[-1] % 3:
      raise ValueError(f"checkpoint tensor {layer}.attn.c_attn "
                       f"{qkv['kernel'].shape}: output width is not 3 n_embd")
    attention = {}
    for n, kernel, bias in zip(("query", "key", "value"),
                               np.split(qkv["kernel"], 3, -1),
                               np.split(qkv["bias"], 3, -1)):
      attention[n] = {"kernel": split_heads(kernel, heads, "d (h k) -> d h k"),
                      "bias": split_heads(bias, heads, "(h k) -> h k")}
    out = dense(f"{layer}.attn.c_proj")
    attention["out"] = {"kernel": split_heads(out["kernel"], heads,
                                               "(h k) d -> h k d"),
                        "bias": out["bias"]}
    params[f"layer_{i}"] = {
        "norm_attention": norm_attention,
        "attention": attention,
        "norm_mlp": norm(f"{layer}.ln_2"),
        "mlp": {"dense_0": dense(f"{layer}.mlp.c_fc"),
                "dense_1": dense(f"{layer}.mlp.c_proj")}}
  params["norm_out"] = norm("ln_f")
  left_over = [k for k in state if k not in used]
  if left_over:
    raise ValueError(f"checkpoint tensor {left_over[0]!r} has no place in "
                     f"TextDecoder(**{dict(config)}) (config.json's n_layer "
                     "or cross-attention?)")
  if head is not None:
    embedding = params["token_embeddings"]["embedding"]
    if (np.shape(head) != embedding.shape
        or not np.array_equal(np.asarray(head, dtype), embedding)):
      raise ValueError("checkpoint tensor 'lm_head.weight' differs from "
                       "'wte.weight': an untied output head, which "
                       "TextDecoder (tied embeddings) cannot represent")
  return params


def decoder_shapes(config: Mapping[str, Any]) -> dict[str, Any]:
  """The parameter shapes of TextDecoder(**config), in the model's order."""
  return param_shapes(TextDecoder(**config),
                      jax.ShapeDtypeStruct((1, 1), jnp.int32))


def check_fits(params: Mapping[str, Any], config: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first parameter of `params` that does not
  fit `TextDecoder(**config)` (missing, extra or of another shape)."""
  mismatch = first_mismatch(decoder_shapes(config), params)
  if mismatch:
    raise ValueError("checkpoint does not fit its config's TextDecoder: "
                     f"{mismatch}")


def load_gpt2(directory: str | os.PathLike, dtype=np.float32,
              id_offset: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
  """Loads a Hugging Face GPT-2-family checkpoint directory without torch.

  Args:
    directory: holds `config.json` and `model.safetensors` (or its shards).
    dtype: numpy dtype of the returned parameters.
    id_offset: zero rows put before the token embedding's, so that id
      i + id_offset is GPT-2's id i (`PADDING_OFFSET` for mmjax's padding
      id 0, `mmjax.models.gpt2_config`); vocab_size grows by as much.

  Returns:
    (decoder_kwargs, params): `TextDecoder(**decoder_kwargs)` (add dropout,
    dtype, remat as needed) and its parameters as numpy arrays.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: naming the config key or tensor TextDecoder cannot
      represent, or the first parameter that does not fit the config.
  """
  config = read_gpt2_config(directory)
  params = convert_gpt2(load_safetensors(pathlib.Path(directory)), config,
                        dtype)
  check_fits(params, config)
  return shift_ids(config, params, id_offset)


def shift_ids(config: Mapping[str, Any], params: dict[str, Any],
              id_offset: int) -> tuple[dict[str, Any], dict[str, Any]]:
  """(config, params) of a decoder whose id i + id_offset is id i: zero rows
  before the token embedding's (and zero columns before an untied head's,
  so the new ids get logit 0); vocab_size grows by `id_offset`."""
  if not id_offset:
    return dict(config), params
  embedding = params["token_embeddings"]["embedding"]
  params["token_embeddings"]["embedding"] = np.concatenate(
      [np.zeros((id_offset, embedding.shape[1]), embedding.dtype), embedding])
  if "lm_head" in params:
    kernel = params["lm_head"]["kernel"]
    params["lm_head"]["kernel"] = np.concatenate(
        [np.zeros((kernel.shape[0], id_offset), kernel.dtype), kernel], 1)
  return {**config, "vocab_size": config["vocab_size"] + id_offset}, params


_LLAMA_PREFIX = "model."


def convert_llama(state: Mapping[str, Any], config: Mapping[str, Any],
                  dtype=np.float32) -> dict[str, Any]:
  """Hugging Face Llama tensors -> `TextDecoder` parameters.

  Args:
    state: name -> array, `LlamaForCausalLM` names ("model.embed_tokens.
      weight", "model.layers.0.self_attn.q_proj.weight", ...,
      "lm_head.weight") or `LlamaModel`'s (no "model." prefix, no head: then
      only a tied config loads).
    config: `TextDecoder` keyword arguments (`mmjax.models.llama_config`).
    dtype: dtype of the returned numpy arrays.

  Returns:
    The parameter tree (what goes under "params" in `TextDecoder.apply`).

  Raises:
    ValueError: a tensor the decoder needs is missing, a tensor is left
      over (more layers than num_hidden_layers, a bias the config does not
      have), or a tied config's "lm_head.weight" differs from the embedding.
  """
  state = {k[len(_LLAMA_PREFIX):] if k.startswith(_LLAMA_PREFIX) else k: v
           for k, v in state.items()
           if not k.endswith("rotary_emb.inv_freq")}   # a buffer
  state = hf_checkpoint_state(state, dtype)
  heads = config["num_heads"]
  kv_heads = config.get("num_kv_heads") or heads
  norm = lambda n: {"scale": state[f"{n}.weight"]}
  params = {"token_embeddings": {"embedding": state["embed_tokens.weight"]}}
  for i in range(config["num_layers"]):
    layer = f"layers.{i}"
    attention = {}
    for ours, theirs, n in (("query", "q_proj", heads), ("key", "k_proj",
                            kv_heads), ("value", "v_proj", kv_heads)):
      dense = torch_dense(state, f"{layer}.self_attn.{theirs}",
                          config["attention_bias"])
      attention[ours] = {"kernel": split_heads(dense["kernel"], n,
                                               "d (h k) -> d h k")}
      if "bias" in dense:
        attention[ours]["bias"] = split_heads(dense["bias"], n,
                                              "(h k) -> h k")
    out = torch_dense(state, f"{layer}.self_attn.o_proj",
                      config["attention_bias"])
    attention["out"] = {**out, "kernel": split_heads(out["kernel"], heads,
                                                     "(h k) d -> h k d")}
    mlp = lambda n: torch_dense(state, f"{layer}.mlp.{n}", config["mlp_bias"])
    params[f"layer_{i}"] = {
        "norm_attention": norm(f"{layer}.input_layernorm"),
        "attention": attention,
        "norm_mlp": norm(f"{layer}.post_attention_layernorm"),
        "mlp": {"dense_0": mlp("gate_proj"), "dense_up": mlp("up_proj"),
                "dense_1": mlp("down_proj")}}
  params["norm_out"] = norm("norm")
  has_head = "lm_head.weight" in state
  if not config["tie_embeddings"]:
    params["lm_head"] = {"kernel": state["lm_head.weight"].T}
  elif has_head and not np.array_equal(state["lm_head.weight"],
                                       params["token_embeddings"]["embedding"]):
    raise ValueError("checkpoint tensor 'lm_head.weight' differs from "
                     "'embed_tokens.weight' although config.json has "
                     "tie_word_embeddings")
  state.check_all_read(f"TextDecoder(**{dict(config)}) (config.json's "
                       "num_hidden_layers, attention_bias or mlp_bias?)")
  return params


def load_llama(directory: str | os.PathLike, dtype=np.float32,
               id_offset: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
  """Loads a Hugging Face Llama-family checkpoint directory without torch:
  as `load_gpt2` (same arguments and returns), for config.json's
  model_type "llama" (`mmjax.models.llama_config.llama_config`)."""
  config = read_llama_config(directory)
  params = convert_llama(load_safetensors(pathlib.Path(directory)), config,
                         dtype)
  check_fits(params, config)
  return shift_ids(config, params, id_offset)
