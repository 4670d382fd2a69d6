"""What a Llama-family checkpoint's config.json says, as `TextDecoder`
keyword arguments, and its start and end tokens (no jax: config files call
it; the loader is `mmjax.models.causal_lm.load_llama`).

Llama (Touvron et al., "LLaMA: Open and Efficient Foundation Language
Models", 2023; Llama 2 and 3 the same architecture with grouped-query
attention and, from 3.1, rescaled rotary frequencies) is TextDecoder with
norm="rms", a SwiGLU feed-forward (gated_mlp, activation "silu"), no biases,
rotary positions of base rope_theta, num_key_value_heads key/value heads and,
unless tie_word_embeddings, a separate output head. Ids move up by
`mmjax.models.gpt2_config.PADDING_OFFSET` for mmjax's padding id 0, as
GPT-2's do.
"""

from collections.abc import Mapping
import json
import os
import pathlib
from typing import Any

# Keys the Llama config.json must have.
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size",
             "num_hidden_layers", "num_attention_heads")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")


def _rope(hf_config: Mapping[str, Any]) -> tuple[float, tuple | None]:
  """(rope_theta, llama3 rescaling or None) from config.json's rope_theta
  and rope_scaling (transformers < 5) or rope_parameters (>= 5)."""
  key = "rope_parameters" if hf_config.get("rope_parameters") else (
      "rope_scaling")
  rope = dict(hf_config.get(key) or {})
  theta = float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind != "llama3":
    raise ValueError(f"config.json: {key} rope_type {kind!r} is not "
                     "supported; TextDecoder has 'default' and 'llama3'")
  missing = [k for k in _LLAMA3_KEYS if k not in rope
             and not (k == "original_max_position_embeddings"
                      and "max_position_embeddings" in hf_config)]
  if missing:
    raise ValueError(f"config.json: {key} lacks {missing[0]!r}")
  original = rope.get("original_max_position_embeddings",
                      hf_config.get("max_position_embeddings"))
  return theta, (float(rope["factor"]), float(rope["low_freq_factor"]),
                 float(rope["high_freq_factor"]), int(original))


def llama_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """`TextDecoder` keyword arguments from a Hugging Face Llama config.json.

  Returns:
    vocab_size, width (hidden_size), num_layers, num_heads, num_kv_heads
    (num_key_value_heads, default num_attention_heads), head_dim (default
    hidden_size / heads), mlp_dim (intermediate_size), max_length
    (max_position_embeddings, default 2048: the KV cache's length; pass a
    smaller one to decode short texts), positions="rotary", rotary_base
    (rope_theta), rotary_llama3, layer_norm_epsilon (rms_norm_eps),
    activation "silu", norm "rms", gated_mlp, attention_bias, mlp_bias and
    tie_embeddings (tie_word_embeddings, default False).

  Raises:
    ValueError: naming the config key TextDecoder cannot represent.
  """
  model_type = hf_config.get("model_type")
  if model_type != "llama":
    raise ValueError(f"config.json: model_type {model_type!r} is not "
                     "supported; load_llama reads model_type 'llama'")
  for key in _REQUIRED:
    if key not in hf_config:
      raise ValueError(f"config.json lacks {key!r}")
  activation = hf_config.get("hidden_act", "silu")
  if activation != "silu":
    raise ValueError(f"config.json: hidden_act {activation!r} is not "
                     "supported; Llama's feed-forward is SwiGLU ('silu')")
  if float(hf_config.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError("config.json: partial_rotary_factor "
                     f"{hf_config['partial_rotary_factor']} is not supported;"
                     " TextDecoder rotates every dimension")
  width, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
  kv_heads = hf_config.get("num_key_value_heads") or heads
  if heads % kv_heads:
    raise ValueError(f"config.json: num_attention_heads={heads} is not a "
                     f"multiple of num_key_value_heads={kv_heads}")
  head_dim = hf_config.get("head_dim") or width // heads
  theta, llama3 = _rope(hf_config)
  return dict(
      vocab_size=hf_config["vocab_size"],
      width=width,
      num_layers=hf_config["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      mlp_dim=hf_config["intermediate_size"],
      max_length=hf_config.get("max_position_embeddings", 2048),
      positions="rotary",
      rotary_base=theta,
      rotary_llama3=llama3,
      layer_norm_epsilon=hf_config.get("rms_norm_eps", 1e-6),
      activation="silu",
      norm="rms",
      gated_mlp=True,
      attention_bias=bool(hf_config.get("attention_bias", False)),
      mlp_bias=bool(hf_config.get("mlp_bias", False)),
      tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)))


def _read_json(directory: str | os.PathLike, name: str) -> dict[str, Any]:
  path = pathlib.Path(directory) / name
  if not path.is_file():
    raise FileNotFoundError(f"Llama checkpoint file {path} does not exist")
  return json.loads(path.read_text())


def read_llama_config(directory: str | os.PathLike,
                      id_offset: int = 0) -> dict[str, Any]:
  """`llama_config` of `directory`/config.json, with `id_offset` more ids
  (PADDING_OFFSET for mmjax's padding convention)."""
  config = llama_config(_read_json(directory, "config.json"))
  return {**config, "vocab_size": config["vocab_size"] + id_offset}


def special_tokens(directory: str | os.PathLike) -> tuple[str, str]:
  """(start, end) token strings of a Llama checkpoint: config.json's
  bos_token_id and eos_token_id (the first, if a list) looked up in
  tokenizer.json (its added tokens or its model's vocabulary)."""
  config = _read_json(directory, "config.json")
  spec = _read_json(directory, "tokenizer.json")
  vocab = spec.get("model", {}).get("vocab") or {}
  tokens = ({i: t[0] for i, t in enumerate(vocab)} if isinstance(vocab, list)
            else {i: t for t, i in vocab.items()})   # Unigram or BPE
  tokens.update({t["id"]: t["content"] for t in spec.get("added_tokens", [])})
  found = []
  for key in ("bos_token_id", "eos_token_id"):
    token_id = config.get(key)
    token_id = token_id[0] if isinstance(token_id, list) else token_id
    if token_id not in tokens:
      raise ValueError(f"config.json: {key}={token_id!r} is not a token of "
                       f"{pathlib.Path(directory) / 'tokenizer.json'}")
    found.append(tokens[token_id])
  return found[0], found[1]
