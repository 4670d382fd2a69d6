"""What a GPT-2 checkpoint's config.json says, as `TextDecoder` keyword
arguments (no jax: config files call it; the loader is
`mmjax.models.causal_lm`).

mmjax's generative models keep id 0 for padding (the captioning loss reads
targets != 0, prompts and generations are padded with 0), while GPT-2's id
0 is "!". So where mmjax trains a GPT-2 (`text.tokenizer = "gpt2:DIR"`,
`model.init = {"decoder": "gpt2:DIR"}`) every id is moved up by
`PADDING_OFFSET` = 1: the tokenizer's ids are GPT-2's plus one, and the
token embedding gets a zero row 0 in front of GPT-2's rows, so the decoder
computes exactly GPT-2's logits in columns 1.. (column 0, padding, has logit
0 at initialisation and is never a target).
"""

from collections.abc import Mapping
import json
import os
import pathlib
from typing import Any

PADDING_OFFSET = 1

# activation_function -> TextDecoder's activation.
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                    "gelu_fast": "gelu_tanh", "gelu": "gelu"}

# Config flags with the only value TextDecoder implements.
_REQUIRED_FLAGS = {"scale_attn_weights": True,
                   "scale_attn_by_inverse_layer_idx": False,
                   "reorder_and_upcast_attn": False,
                   "add_cross_attention": False}



def gpt2_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """`TextDecoder` keyword arguments from a Hugging Face GPT-2 config.json.

  Returns:
    vocab_size, width (n_embd), num_layers (n_layer), num_heads (n_head),
    mlp_dim (n_inner, default 4 n_embd), max_length (n_positions),
    positions="learned", layer_norm_epsilon and activation.

  Raises:
    ValueError: naming the config key TextDecoder cannot represent.
  """
  model_type = hf_config.get("model_type")
  if model_type != "gpt2":
    raise ValueError(f"config.json: model_type {model_type!r} is not "
                     "supported; load_gpt2 reads model_type 'gpt2'")
  activation = hf_config.get("activation_function", "gelu_new")
  if activation not in GPT2_ACTIVATIONS:
    raise ValueError(f"config.json: activation_function {activation!r} is "
                     "not supported; TextDecoder has "
                     f"{sorted(GPT2_ACTIVATIONS)}")
  for key, value in _REQUIRED_FLAGS.items():
    if bool(hf_config.get(key, value)) != value:
      raise ValueError(f"config.json: {key}={hf_config[key]!r} is not "
                       f"supported; TextDecoder needs {key}={value}")
  for key in ("vocab_size", "n_embd", "n_head", "n_layer", "n_positions"):
    if key not in hf_config:
      raise ValueError(f"config.json lacks {key!r}")
  width, heads = hf_config["n_embd"], hf_config["n_head"]
  if width % heads:
    raise ValueError(f"config.json: n_embd={width} is not divisible by "
                     f"n_head={heads}")
  return dict(
      vocab_size=hf_config["vocab_size"],
      width=width,
      num_layers=hf_config["n_layer"],
      num_heads=heads,
      mlp_dim=hf_config.get("n_inner") or 4 * width,
      max_length=hf_config["n_positions"],
      positions="learned",
      layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-5),
      activation=GPT2_ACTIVATIONS[activation])


def read_gpt2_config(directory: str | os.PathLike,
                     id_offset: int = 0) -> dict[str, Any]:
  """`gpt2_config` of `directory`/config.json, with `id_offset` more ids
  (PADDING_OFFSET for mmjax's padding convention)."""
  path = pathlib.Path(directory) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"GPT-2 checkpoint file {path} does not exist")
  config = gpt2_config(json.loads(path.read_text()))
  return {**config, "vocab_size": config["vocab_size"] + id_offset}


def token_id(directory: str | os.PathLike, token: str,
             id_offset: int = 0) -> int:
  """The id of `token` in `directory`/tokenizer.json (its added tokens or
  its model's vocabulary), plus `id_offset`."""
  path = pathlib.Path(directory) / "tokenizer.json"
  if not path.is_file():
    raise FileNotFoundError(f"tokenizer file {path} does not exist")
  spec = json.loads(path.read_text())
  ids = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
  ids = {**(spec.get("model", {}).get("vocab") or {}), **ids}
  if token not in ids:
    raise ValueError(f"token {token!r} is not in the vocabulary of {path}")
  return ids[token] + id_offset
