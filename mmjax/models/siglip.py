"""Pretrained SigLIP towers, converted without torch.

Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023. A
SigLIP is a `ContrastiveModel` (objective "sigmoid") whose image tower is a
`ViT` with a learned position embedding of the patches (no class token), a
patch embedding with bias, tanh-approximated GELU and multihead attention
pooling (`MAPHead`, pool "map") after the final LayerNorm, with no
projection ("none": the head's output is the embedding); its text tower is
a bidirectional `TextTransformer` read at the last position (pool "last")
whose projection is a Dense with bias. The learned logit scale and bias are
the model's `log_scale` and `bias`.

Formats: Hugging Face `SiglipModel`, a directory with config.json
(model_type "siglip") and model.safetensors (or its shards); and
big_vision's two-tower `.npz` (a file, or a directory holding one .npz),
its flattened Flax names ("params/img/...", "params/txt/...",
"params/t", "params/b"; `big_vision_siglip_config`, `convert_big_vision`).

`siglip_config(directory)` gives the mmjax model configuration (to put in
`config.model`); `load_siglip(directory)` the whole `ContrastiveModel`
tree ({"tower_image", "tower_text", "log_scale", "bias"}), of which
`config.model.init` entries "siglip:DIR" take the subtree at their path.
The text goes through the checkpoint's spiece.model, as Hugging Face's
SiglipTokenizer tokenises it (`mmjax.data.tokenizer.SiglipTokenizer`,
config.text.tokenizer "siglip:DIR"): padded with "</s>" to the full
max_length, since the text tower reads the last position. configs/lit.py
trains LiT from a SigLIP checkpoint.

Mapping (Hugging Face names):

  vision_model.embeddings.patch_embedding [D, C, p, p] (+ bias)   image
      encoder embedding/{kernel [p, p, C, D], bias};
      position_embedding [N, D] pos_embedding [1, N, D]
  *.encoder.layers.<i>.layer_norm1, layer_norm2  block_<i> / layer_<i>
      norm_attention, norm_mlp
  *.self_attn.{q,k,v}_proj, out_proj             attention/{query,key,
      value,out} (heads split as in mmjax.models.clip)
  *.mlp.fc1, fc2                                 mlp/dense_0, dense_1
  vision_model.post_layernorm                    encoder_norm
  vision_model.head.probe [1, 1, D]              map_head/probe
  vision_model.head.attention.in_proj_{weight [3D, D], bias [3D]}
      map_head/attention/{query,key,value}; .out_proj -> .../out
  vision_model.head.layernorm, mlp.fc1, mlp.fc2  map_head/norm, mlp/dense_*
  text_model.embeddings.token_embedding, position_embedding   text encoder
      token_embedding/embedding, position_embedding [L, D]
  text_model.final_layer_norm                    norm_out
  text_model.head [E, D] (+ bias)                tower_text/projection
  logit_scale [1], logit_bias [1]                log_scale, bias

The image embedding is the MAP head's output, of the vision width, so the
text head's projection_size must equal the vision hidden_size (as in every
released SigLIP). What the modules cannot represent is refused with a
ValueError naming the config key (another activation, vision_use_head
false, a non-square image, other channel counts); a checkpoint whose
tensors do not fit its config names the first such parameter. Needs only
`safetensors`; torch is never imported. Parity with `SiglipModel` is
checked in tests/test_siglip.py.
"""

from collections.abc import Mapping
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models.clip import (build_clip, encoder_blocks,
                               text_transformer_params)
from mmjax.models.clip_config import hf_activation, hf_tower_configs
from mmjax.models.contrastive import ContrastiveModel
from mmjax.models.convert import (check_fits, hf_checkpoint_state,
                                  load_safetensors, param_shapes,
                                  torch_attention, torch_dense, torch_norm)

# SigLIP's image normalisation: [0, 1] -> [-1, 1].
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)

# SiglipTextConfig's and SiglipVisionConfig's defaults, for config.json
# files that leave keys out.
_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768,
                      intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=64,
                      hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                      projection_size=None)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072,
                        num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=16,
                        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                        vision_use_head=True)


def _side(value, key: str) -> int:
  """An int, or a square [h, w] pair, as one int; ValueError otherwise."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"config.json: {key}={value!r} is not supported "
                       "(square only)")
    value = value[0]
  return int(value)


def hf_siglip_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """The mmjax model configuration of a Hugging Face SigLIP config.json.

  Returns:
    {"model": {"encoders": {"image": ViT spec (pool "map") with a "pixels"
    front end (mean = std = 0.5), "text": TextTransformer spec (causal
    False, pool "last")}, "projections": {"image": "none", "text":
    "dense"}, "embed_dim": the vision width, "objective": "sigmoid"},
    "image_size": the ViT's input side, "max_length": the text context}.

  Raises:
    ValueError: naming the config key the modules cannot represent.
  """
  text, vision = hf_tower_configs(hf_config, "siglip", _TEXT_DEFAULTS,
                                  _VISION_DEFAULTS)
  if not vision["vision_use_head"]:
    raise ValueError("config.json: vision_config.vision_use_head=False is "
                     "not supported (SiglipModel's image embedding is the "
                     "attention-pooling head's)")
  width = vision["hidden_size"]
  projection = text["projection_size"] or text["hidden_size"]
  if projection != width:
    raise ValueError(f"config.json: text_config.projection_size={projection}"
                     f" is not supported: the image embedding has the vision "
                     f"hidden_size {width}")
  image = dict(
      name="vit", width=width, depth=vision["num_hidden_layers"],
      mlp_dim=vision["intermediate_size"],
      num_heads=vision["num_attention_heads"],
      patch_size=_side(vision["patch_size"], "vision_config.patch_size"),
      pool="map", posemb="learn", pre_norm=False, patch_bias=True,
      activation=hf_activation(vision["hidden_act"],
                               "vision_config.hidden_act"),
      layer_norm_epsilon=vision["layer_norm_eps"],
      frontend=dict(name="pixels", mean=list(SIGLIP_MEAN),
                    std=list(SIGLIP_STD)))
  text_spec = dict(
      name="text_transformer", vocab_size=text["vocab_size"],
      width=text["hidden_size"], num_layers=text["num_hidden_layers"],
      num_heads=text["num_attention_heads"],
      mlp_dim=text["intermediate_size"],
      max_length=text["max_position_embeddings"], causal=False, pool="last",
      activation=hf_activation(text["hidden_act"], "text_config.hidden_act"),
      layer_norm_epsilon=text["layer_norm_eps"])
  return {"model": {"encoders": {"image": image, "text": text_spec},
                    "projections": {"image": "none", "text": "dense"},
                    "embed_dim": width, "objective": "sigmoid"},
          "image_size": _side(vision["image_size"], "vision_config.image_size"),
          "max_length": text["max_position_embeddings"]}


def _fused_attention(state, name, num_heads):
  """torch nn.MultiheadAttention `name` (in_proj_weight [3D, D],
  in_proj_bias [3D], out_proj) as nn.MultiHeadDotProductAttention's."""
  return torch_attention(
      np.split(state[f"{name}.in_proj_weight"], 3, axis=0),
      np.split(state[f"{name}.in_proj_bias"], 3, axis=0),
      torch_dense(state, f"{name}.out_proj"), num_heads)


def convert_siglip(state: Mapping[str, Any], config: Mapping[str, Any],
                   dtype=np.float32) -> dict[str, Any]:
  """`SiglipModel` tensors -> the `ContrastiveModel` parameter tree.

  Args:
    state: name -> array, Hugging Face names (module docstring).
    config: `hf_siglip_config(...)`.
    dtype: dtype of the returned numpy arrays.

  Raises:
    ValueError: a tensor the model needs is missing, or one is left over.
  """
  state = hf_checkpoint_state(state, dtype)
  image, text = (config["model"]["encoders"][m] for m in ("image", "text"))
  embeddings = "vision_model.embeddings"
  heads = image["num_heads"]
  head = "vision_model.head"
  vit = {
      "embedding": {
          "kernel": np.transpose(
              state[f"{embeddings}.patch_embedding.weight"], (2, 3, 1, 0)),
          "bias": state[f"{embeddings}.patch_embedding.bias"]},
      "pos_embedding": state[f"{embeddings}.position_embedding.weight"][None],
      **encoder_blocks(state, "vision_model", image["depth"], heads, "block_"),
      "encoder_norm": torch_norm(state, "vision_model.post_layernorm"),
      "map_head": {
          "probe": state[f"{head}.probe"],
          "attention": _fused_attention(state, f"{head}.attention", heads),
          "norm": torch_norm(state, f"{head}.layernorm"),
          "mlp": {"dense_0": torch_dense(state, f"{head}.mlp.fc1"),
                  "dense_1": torch_dense(state, f"{head}.mlp.fc2")}}}
  transformer = text_transformer_params(state, text)
  params = {
      "log_scale": state["logit_scale"].reshape(()),
      "bias": state["logit_bias"].reshape(()),
      "tower_image": {"encoder": vit},
      "tower_text": {"encoder": transformer,
                     "projection": torch_dense(state, "text_model.head")}}
  state.check_all_read("the SigLIP model of its config (more layers than "
                       "num_hidden_layers?)")
  return params


def build_siglip(config: Mapping[str, Any]) -> ContrastiveModel:
  """The `ContrastiveModel` of `hf_siglip_config(...)` (float32), whose
  parameter tree `convert_siglip` fills: the CLIP builder's, from the same
  keys."""
  return build_clip(config)


# ------------------------------------------------------------ big_vision ---
#
# big_vision (github.com/google-research/big_vision) names, from
# models/proj/image_text/two_towers.py (towers "img" and "txt", params "t"
# and "b"), models/vit.py (ViT: "embedding", "pos_embedding" [1, N, D]
# added before the optional "cls", "Transformer/encoderblock_<i>" with
# LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0/
# Dense_0, Dense_1, or one stacked "encoderblock" when trained with scan,
# "Transformer/encoder_norm", "MAPHead_0"/{probe,
# MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}, "head") and
# models/proj/image_text/text_transformer.py ("Embed_0", "pos_embedding"
# [1, L, D], "Encoder_0/..." as the ViT's Transformer, "head"). All of it
# is Flax already: only names change. big_vision's MlpBlock uses nn.gelu
# (tanh approximation), every LayerNorm flax's default epsilon 1e-6, the
# text tower no mask and pool "last" (the released SigLIPs'; a text
# MAPHead is refused), the image tower pool "map" ("cls", pool "tok", is
# refused). Head counts come from the attention kernels [D, H, D/H].

_BV_BLOCK = {"LayerNorm_0": "norm_attention",
             "MultiHeadDotProductAttention_0": "attention",
             "LayerNorm_1": "norm_mlp", "MlpBlock_0": "mlp"}
_BV_MLP = {"Dense_0": "dense_0", "Dense_1": "dense_1"}
_BV_MAP = {"probe": "probe", "MultiHeadDotProductAttention_0": "attention",
           "LayerNorm_0": "norm", "MlpBlock_0": "mlp"}


def _recover_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
  """"a/b/c" -> {"a": {"b": {"c": ...}}} (big_vision's recover_tree); void
  arrays of 2 bytes are bfloat16, as big_vision's recover_dtype reads
  them."""
  tree = {}
  for name, value in flat.items():
    value = np.asarray(value)
    if value.dtype.type is np.void and value.itemsize == 2:
      value = value.view(jnp.bfloat16)
    node = tree
    *parents, leaf = name.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _bv_tower_root(tree: Mapping[str, Any]) -> Mapping[str, Any]:
  """The two-tower subtree of a big_vision checkpoint tree (its "params",
  or "opt/target", or the tree itself, as big_vision's load_params)."""
  if "params" in tree:
    tree = tree["params"]
  elif "opt" in tree:
    tree = tree["opt"]["target"]
  if "img" not in tree or "txt" not in tree:
    raise ValueError("big_vision checkpoint: no 'img' and 'txt' towers "
                     f"(top-level keys: {sorted(tree)})")
  return tree


def _bv_rename(tree, names, where):
  out = {}
  for key, value in tree.items():
    if key not in names:
      raise ValueError(f"big_vision checkpoint: {where}/{key} has no place "
                       "in the model")
    out[names[key]] = value
  return out


def _bv_blocks(encoder, where, ours):
  """encoderblock_<i> (or a scanned, stacked encoderblock) -> {ours<i>}."""
  encoder = dict(encoder)
  if "encoderblock" in encoder:  # trained with scan: [depth, ...]
    stacked = encoder.pop("encoderblock")
    depth = len(stacked["LayerNorm_0"]["bias"])
    for i in range(depth):
      encoder[f"encoderblock_{i}"] = jax.tree.map(lambda a, i=i: a[i],
                                                  stacked)
  blocks = {}
  count = len([k for k in encoder if k.startswith("encoderblock_")])
  for i in range(count):
    name = f"encoderblock_{i}"
    if name not in encoder:
      raise ValueError(f"big_vision checkpoint lacks {where}/{name}")
    block = _bv_rename(encoder.pop(name), _BV_BLOCK, f"{where}/{name}")
    if "mlp" in block:
      block["mlp"] = _bv_rename(block["mlp"], _BV_MLP,
                                f"{where}/{name}/MlpBlock_0")
    blocks[f"{ours}{i}"] = block
  return blocks, encoder


def _num_heads(blocks, where):
  try:
    return int(np.shape(blocks["0"]["attention"]["query"]["kernel"])[1])
  except (KeyError, IndexError) as e:
    raise ValueError(f"big_vision checkpoint: {where} has no attention "
                     "query kernel [D, H, D/H]") from e


def convert_big_vision(flat: Mapping[str, Any],
                       dtype=np.float32) -> tuple[dict[str, Any],
                                                  dict[str, Any]]:
  """A big_vision SigLIP checkpoint (flat "params/img/..." names -> arrays,
  as in its .npz) -> (config as `hf_siglip_config` gives it, the
  ContrastiveModel parameter tree).

  The image tower's "head" (big_vision's out_dim[0], absent from the
  released SigLIPs) becomes a "dense" image projection. A checkpoint
  without "b" (a softmax two-tower) gets objective "softmax", bias 0.

  Raises:
    ValueError: naming what the modules cannot represent or where.
  """
  tree = jax.tree.map(lambda a: np.asarray(a, dtype),
                      _bv_tower_root(_recover_tree(flat)))
  img, txt = dict(tree["img"]), dict(tree["txt"])
  for key in ("cls", "pre_logits"):
    if key in img:
      raise ValueError(f"big_vision checkpoint: img/{key} is not supported "
                       "(pool_type 'tok' or rep_size)")
  if "MAPHead_0" in txt:
    raise ValueError("big_vision checkpoint: txt/MAPHead_0 (text pool_type "
                     "'map') is not supported")
  if "MAPHead_0" not in img:
    raise ValueError("big_vision checkpoint: img/MAPHead_0 is missing (only "
                     "pool_type 'map' image towers are supported)")
  transformer = dict(img.pop("Transformer", {}))
  blocks, transformer = _bv_blocks(transformer, "img/Transformer", "block_")
  vit = {"embedding": img.pop("embedding"),
         "pos_embedding": img.pop("pos_embedding"), **blocks,
         "encoder_norm": transformer.pop("encoder_norm")}
  if transformer:
    raise ValueError(f"big_vision checkpoint: img/Transformer/"
                     f"{next(iter(transformer))} has no place in the model")
  head = _bv_rename(img.pop("MAPHead_0"), _BV_MAP, "img/MAPHead_0")
  head["mlp"] = _bv_rename(head["mlp"], _BV_MLP, "img/MAPHead_0/MlpBlock_0")
  vit["map_head"] = head
  image_head = img.pop("head", None)
  if img:
    raise ValueError(f"big_vision checkpoint: img/{next(iter(img))} has no "
                     "place in the model")
  encoder = dict(txt.pop("Encoder_0", {}))
  layers, encoder = _bv_blocks(encoder, "txt/Encoder_0", "layer_")
  position = txt.pop("pos_embedding")
  # big_vision's text load(): some checkpoints add a second one here.
  position = position + encoder.pop("pos_embedding", 0)
  text = {"token_embedding": txt.pop("Embed_0"),
          "position_embedding": position[0], **layers,
          "norm_out": encoder.pop("encoder_norm")}
  if encoder:
    raise ValueError(f"big_vision checkpoint: txt/Encoder_0/"
                     f"{next(iter(encoder))} has no place in the model")
  text_head = txt.pop("head", None)
  if txt:
    raise ValueError(f"big_vision checkpoint: txt/{next(iter(txt))} has no "
                     "place in the model")
  if text_head is None:
    raise ValueError("big_vision checkpoint lacks txt/head")
  kernel = vit["embedding"]["kernel"]
  width = kernel.shape[-1]
  grid = int(round(vit["pos_embedding"].shape[1]**0.5))
  embed_dim = text_head["kernel"].shape[-1]
  if image_head is None and embed_dim != width:
    raise ValueError(f"big_vision checkpoint: txt/head width {embed_dim} "
                     f"is not the image width {width} (no img/head)")
  image_spec = dict(
      name="vit", width=width, depth=len(blocks),
      mlp_dim=vit["map_head"]["mlp"]["dense_0"]["kernel"].shape[-1],
      num_heads=_num_heads({"0": head}, "img/MAPHead_0"),
      patch_size=kernel.shape[0], pool="map", posemb="learn",
      pre_norm=False, patch_bias="bias" in vit["embedding"],
      activation="gelu_tanh", layer_norm_epsilon=1e-6,
      frontend=dict(name="pixels", mean=list(SIGLIP_MEAN),
                    std=list(SIGLIP_STD)))
  if blocks:
    image_spec["mlp_dim"] = blocks["block_0"]["mlp"]["dense_0"][
        "kernel"].shape[-1]
  vocab, text_width = text["token_embedding"]["embedding"].shape
  text_spec = dict(
      name="text_transformer", vocab_size=vocab, width=text_width,
      num_layers=len(layers),
      num_heads=_num_heads({"0": layers.get("layer_0", {})},
                           "txt/Encoder_0/encoderblock_0"),
      mlp_dim=layers["layer_0"]["mlp"]["dense_0"]["kernel"].shape[-1]
      if layers else 4 * text_width,
      max_length=position.shape[1], causal=False, pool="last",
      activation="gelu_tanh", layer_norm_epsilon=1e-6)
  bias = tree.get("b")
  config = {"model": {"encoders": {"image": image_spec, "text": text_spec},
                      "projections": {"image": "none" if image_head is None
                                      else "dense", "text": "dense"},
                      "embed_dim": embed_dim,
                      "objective": "softmax" if bias is None else "sigmoid"},
            "image_size": grid * kernel.shape[0],
            "max_length": position.shape[1]}
  tower_image = {"encoder": vit}
  if image_head is not None:
    tower_image["projection"] = image_head
  params = {"log_scale": np.reshape(tree["t"], ()),
            "bias": np.zeros((), dtype) if bias is None
            else np.reshape(bias, ()),
            "tower_image": tower_image,
            "tower_text": {"encoder": text, "projection": text_head}}
  return config, params


def _npz(path: pathlib.Path) -> pathlib.Path | None:
  """The big_vision .npz of `path` (the file, or a directory's only .npz
  when it has no config.json), else None."""
  if path.is_file() and path.suffix == ".npz":
    return path
  if path.is_dir() and not (path / "config.json").is_file():
    found = sorted(p for p in path.glob("*.npz") if p.name != "reference.npz")
    if len(found) == 1:
      return found[0]
  return None


def _load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as loaded:
    return dict(loaded)


def big_vision_siglip_config(path: str | os.PathLike) -> dict[str, Any]:
  """The mmjax configuration of a big_vision SigLIP .npz (from its shapes)."""
  return convert_big_vision(_load_npz(pathlib.Path(path)))[0]


def siglip_config(directory: str | os.PathLike) -> dict[str, Any]:
  """The mmjax configuration of the SigLIP checkpoint at `directory`
  (`hf_siglip_config` of its config.json, or a big_vision .npz's)."""
  directory = pathlib.Path(directory)
  npz = _npz(directory)
  if npz is not None:
    return big_vision_siglip_config(npz)
  path = directory / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{directory} is not a SigLIP checkpoint: it has "
                            "no config.json (Hugging Face SiglipModel) nor "
                            "one big_vision .npz")
  return hf_siglip_config(json.loads(path.read_text()))


def load_siglip(directory: str | os.PathLike,
                dtype=np.float32) -> tuple[dict[str, Any], dict[str, Any]]:
  """Loads a SigLIP checkpoint without torch: a Hugging Face directory, or
  a big_vision .npz (the file, or a directory holding just it).

  Returns:
    (config, params): `siglip_config(directory)` and the ContrastiveModel
    parameters ("log_scale", "bias", "tower_image", "tower_text") as numpy
    arrays.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: naming the config key the modules cannot represent, or the
      first parameter that does not fit the config.
  """
  directory = pathlib.Path(directory)
  npz = _npz(directory)
  if npz is not None:
    config, params = convert_big_vision(_load_npz(npz), dtype)
  else:
    config = siglip_config(directory)
    params = convert_siglip(load_safetensors(directory), config, dtype)
  side, length = config["image_size"], config["max_length"]
  expected = param_shapes(
      build_siglip(config),
      {"image": jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32),
       "text": jax.ShapeDtypeStruct((1, length), jnp.int32)})
  check_fits(params, expected, f"the SigLIP model of {directory}")
  return config, params
