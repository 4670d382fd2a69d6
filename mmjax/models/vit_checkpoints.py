"""ViT-only checkpoints into a `ViT` encoder subtree, without torch.

Formats: big_vision / AugReg `.npz` (`load_big_vision_vit`, below) and
timm `VisionTransformer` safetensors (a timm Hugging Face Hub
directory: model.safetensors and config.json with "architecture" and
"model_args"; or a bare .safetensors file). `load_timm_vit(path)` returns
(ViT keyword arguments, parameters) for `ViT(**kwargs)` with pool "cls":
timm's forward_features(x)[:, 0] (the class token after the final norm)
is the ViT's output [B, 1, D]. The input is normalised by the caller
(timm's pretrained_cfg mean and std, see `timm_preprocessing`).

Mapping (timm names -> ViT parameters):

  patch_embed.proj.weight [D, C, p, p] (+ bias)   embedding/{kernel
      [p, p, C, D], bias}
  cls_token [1, 1, D]                             cls
  pos_embed [1, N + 1, D]                         pos_embedding
  norm_pre                                        norm_pre (pre_norm=True)
  blocks.<i>.norm1, norm2                         block_<i>/norm_attention,
      norm_mlp
  blocks.<i>.attn.qkv [3D, D] (+ bias [3D])       block_<i>/attention/
      {query,key,value} (heads split); a missing qkv bias (qkv_bias=False)
      becomes zeros, which computes the same
  blocks.<i>.attn.proj                            block_<i>/attention/out
  blocks.<i>.mlp.fc1, fc2                         block_<i>/mlp/dense_0, 1
  norm                                            encoder_norm
  head.*                                          dropped (the classifier
      is not part of the encoder)

The architecture comes from the tensors' shapes (width, depth, patch,
mlp_dim, image size) and, for what shapes do not tell, config.json's
model_args (num_heads) or the architecture name (num_heads of the
tiny/small/base/large/huge/giant sizes; LayerNorm epsilon 1e-5 for timm's
CLIP towers "*_clip_*", else timm's 1e-6; QuickGELU for "*quickgelu*"),
overridable by arguments. What `ViT` cannot represent is refused with a
ValueError naming the model_args key or the tensor (global pools other
than "token", no class token, register tokens, layer scale, q/k norms,
fc_norm, position embeddings without the class token's).
"""

from collections.abc import Mapping
import json
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models.convert import (TrackedState, check_fits, load_safetensors,
                                  param_shapes, torch_attention, torch_dense,
                                  torch_norm)
from mmjax.models.encoders.vit import ViT

# timm size names -> num_heads (timm's vision_transformer.py model defs).
TIMM_NUM_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12,
                  "large": 16, "huge": 16, "giant": 16, "gigantic": 16}

# timm VisionTransformer model_args whose other values ViT lacks.
_TIMM_UNSUPPORTED = {
    "global_pool": "token", "class_token": True, "no_embed_class": False,
    "reg_tokens": 0, "init_values": None, "qk_norm": False,
    "scale_attn_norm": False, "scale_mlp_norm": False, "fc_norm": None,
    "final_norm": True, "pos_embed": "learn", "in_chans": 3,
    "dynamic_img_size": False, "embed_norm_layer": None,
    "pool_include_prefix": False, "proj_bias": True}

# Tensor name patterns of timm features ViT lacks.
_TIMM_UNSUPPORTED_TENSORS = (
    (r"reg_token", "register tokens"), (r"\.ls[12]\.", "layer scale"),
    (r"\.(q|k)_norm\.", "q/k norms"), (r"^fc_norm\.", "fc_norm"),
    (r"^attn_pool\.", "attention pooling (global_pool='map')"),
    (r"\.norm\.(weight|bias)$", "norms inside attention or the MLP"),
    (r"^patch_embed\.norm\.", "a patch embedding norm"))


def _files(path: pathlib.Path) -> tuple[pathlib.Path, str, dict[str, Any]]:
  """(directory, safetensors stem, config.json or {}) of a timm path."""
  if path.is_file():
    directory, stem = path.parent, path.name.removesuffix(".safetensors")
    config_path = directory / "config.json"
  else:
    directory, stem, config_path = path, "model", path / "config.json"
  config = json.loads(config_path.read_text()) if config_path.is_file() \
      else {}
  return directory, stem, config


def timm_preprocessing(path: str | os.PathLike) -> dict[str, Any]:
  """{"mean", "std", "image_size"} of config.json's pretrained_cfg (mean and
  std for a PixelNormalize front end; timm's ImageNet defaults and 224
  where config.json or the keys are absent; image_size from input_size,
  else model_args.img_size)."""
  _, _, config = _files(pathlib.Path(path))
  pretrained = config.get("pretrained_cfg", {})
  side = pretrained.get("input_size", [None])[-1] or config.get(
      "model_args", {}).get("img_size", 224)
  if isinstance(side, (list, tuple)):
    side = side[-1]
  return {"mean": list(pretrained.get("mean", (0.485, 0.456, 0.406))),
          "std": list(pretrained.get("std", (0.229, 0.224, 0.225))),
          "image_size": int(side)}


def convert_timm_vit(state: Mapping[str, Any], config: Mapping[str, Any],
                     num_heads: int | None = None,
                     layer_norm_epsilon: float | None = None,
                     dtype=np.float32) -> tuple[dict[str, Any],
                                                dict[str, Any]]:
  """timm VisionTransformer tensors (+ its config.json) -> (ViT kwargs,
  parameters); see the module docstring. ValueError for what ViT cannot
  represent or a missing tensor. The checkpoint's image side is
  `patch_size * sqrt(pos_embedding.shape[1] - 1)`."""
  model_args = dict(config.get("model_args", {}))
  if "global_pool" in config:
    model_args.setdefault("global_pool", config["global_pool"])
  for key, default in _TIMM_UNSUPPORTED.items():
    if key in model_args and model_args[key] != default:
      if key == "global_pool" and model_args[key] in ("", None):
        continue  # the same features; the pool is the caller's
      if key == "fc_norm" and model_args[key] is False:
        continue  # None means False with the token pool
      raise ValueError(f"timm config.json: model_args.{key}="
                       f"{model_args[key]!r} is not supported")
  for pattern, what in _TIMM_UNSUPPORTED_TENSORS:
    found = next((k for k in state if re.search(pattern, k)), None)
    if found:
      raise ValueError(f"timm checkpoint tensor {found!r}: {what} are not "
                       "supported")
  state = {k: np.asarray(v, dtype) for k, v in state.items()
           if not k.startswith("head.")}
  for name in ("patch_embed.proj.weight", "cls_token", "pos_embed",
               "norm.weight"):
    if name not in state:
      raise ValueError(f"timm checkpoint lacks tensor {name!r}"
                       + (" (class_token=False is not supported)"
                          if name == "cls_token" else ""))
  arch = str(config.get("architecture", ""))
  if num_heads is None:
    num_heads = model_args.get("num_heads")
  if num_heads is None:
    size = next((s for s in re.split(r"[_\d]+", arch) if s in TIMM_NUM_HEADS),
                None)
    if size is None:
      raise ValueError("timm checkpoint: num_heads is not in config.json's "
                       f"model_args nor known for architecture {arch!r}; "
                       "pass num_heads")
    num_heads = TIMM_NUM_HEADS[size]
  if layer_norm_epsilon is None:
    layer_norm_epsilon = 1e-5 if "_clip_" in arch else 1e-6
  patch = state["patch_embed.proj.weight"]
  width, channels, p, q = patch.shape
  if p != q or channels != 3:
    raise ValueError(f"timm checkpoint: patch_embed.proj.weight "
                     f"{patch.shape} (square RGB patches only)")
  depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
  tokens = state["pos_embed"].shape[1] - 1
  grid = int(round(tokens**0.5))
  if grid * grid != tokens:
    raise ValueError(f"timm checkpoint: pos_embed {state['pos_embed'].shape}"
                     " is not a square grid plus the class token "
                     "(no_embed_class is not supported)")
  kwargs = dict(width=width, depth=depth,
                mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0]
                if depth else 4 * width,
                num_heads=num_heads, patch_size=p, pool="cls",
                posemb="learn", pre_norm="norm_pre.weight" in state,
                patch_bias="patch_embed.proj.bias" in state,
                activation="quick_gelu" if "quickgelu" in arch else "gelu",
                layer_norm_epsilon=layer_norm_epsilon)
  state = TrackedState(state, "timm checkpoint")
  embedding = {"kernel": np.transpose(state["patch_embed.proj.weight"],
                                      (2, 3, 1, 0))}
  if kwargs["patch_bias"]:
    embedding["bias"] = state["patch_embed.proj.bias"]
  params = {"embedding": embedding, "cls": state["cls_token"],
            "pos_embedding": state["pos_embed"]}
  if kwargs["pre_norm"]:
    params["norm_pre"] = torch_norm(state, "norm_pre")
  for i in range(depth):
    block = f"blocks.{i}"
    qkv = state[f"{block}.attn.qkv.weight"]
    bias = (state[f"{block}.attn.qkv.bias"]
            if f"{block}.attn.qkv.bias" in state
            else np.zeros(qkv.shape[:1], dtype))
    attention = torch_attention(np.split(qkv, 3), np.split(bias, 3),
                                torch_dense(state, f"{block}.attn.proj"),
                                num_heads)
    params[f"block_{i}"] = {
        "norm_attention": torch_norm(state, f"{block}.norm1"),
        "attention": attention,
        "norm_mlp": torch_norm(state, f"{block}.norm2"),
        "mlp": {"dense_0": torch_dense(state, f"{block}.mlp.fc1"),
                "dense_1": torch_dense(state, f"{block}.mlp.fc2")}}
  params["encoder_norm"] = torch_norm(state, "norm")
  state.check_all_read("the ViT")
  return kwargs, params


def load_timm_vit(path: str | os.PathLike, num_heads: int | None = None,
                  layer_norm_epsilon: float | None = None,
                  dtype=np.float32) -> tuple[dict[str, Any], dict[str, Any]]:
  """Loads a timm ViT (a directory with model.safetensors, or a
  .safetensors file; config.json beside it if any) without torch.

  Args:
    path: the directory or file.
    num_heads, layer_norm_epsilon: override what config.json and the
      architecture name give (module docstring).
    dtype: of the returned arrays.

  Returns:
    (kwargs, params): `ViT(**kwargs)` keyword arguments (pool "cls") and its
    parameter tree as numpy arrays.

  Raises:
    FileNotFoundError: no safetensors file.
    ValueError: naming what ViT cannot represent, or the first parameter
      that does not fit.
  """
  path = pathlib.Path(path)
  directory, stem, config = _files(path)
  state = load_safetensors(directory, stem)
  kwargs, params = convert_timm_vit(state, config, num_heads,
                                    layer_norm_epsilon, dtype)
  side = kwargs["patch_size"] * int(round(
      (np.shape(params["pos_embedding"])[1] - 1)**0.5))
  expected = param_shapes(ViT(**kwargs),
                          jax.ShapeDtypeStruct((1, side, side, 3),
                                               jnp.float32), train=False)
  check_fits(params, expected, f"the ViT of {path}")
  return kwargs, params


# ------------------------------------------------------------ big_vision ---


def _renumber_pre_linen(tree):
  """flax's convert_pre_linen: pre-Linen modules were numbered with one
  counter per parent ("LayerNorm_0", "MultiHeadDotProductAttention_1",
  "LayerNorm_2", "MlpBlock_3"), Linen ones with one per class; renumbers
  each class's modules 0, 1, ... in their old order."""
  if not isinstance(tree, Mapping):
    return tree
  groups = {}
  for key in tree:
    match = re.fullmatch(r"(.+)_(\d+)", key)
    if match:
      groups.setdefault(match.group(1), []).append((int(match.group(2)), key))
  rename = {}
  for prefix, members in groups.items():
    for i, (_, key) in enumerate(sorted(members)):
      rename[key] = f"{prefix}_{i}"
  return {rename.get(k, k): _renumber_pre_linen(v) for k, v in tree.items()}


def convert_big_vision_vit(flat: Mapping[str, Any], dtype=np.float32
                           ) -> tuple[dict[str, Any], dict[str, Any]]:
  """A big_vision / AugReg ViT checkpoint (flat "/"-joined names -> arrays,
  as in its .npz) -> (ViT kwargs, parameters).

  Names from big_vision's models/vit.py (its load(): fix_old_checkpoints
  and flax's convert_pre_linen): "embedding", "pos_embedding" [1, N, D]
  (added before the class token; newer) or "Transformer/posembed_input/
  pos_embedding" / "Transformer/pos_embedding" [1, N + 1, D] (added after
  it; AugReg's), "cls" (pool "tok" -> "cls"), "Transformer/
  encoderblock_<i>" (or a scanned "encoderblock") with LayerNorm_0,
  MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0 (pre-Linen
  AugReg names LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
  MlpBlock_3 are renumbered), "Transformer/encoder_norm", "MAPHead_0"
  (pool "map"); neither cls nor MAPHead_0 is pool "gap". The position
  embedding without the class token's gets a zero row for it (the same
  sum). "head" and "pre_logits" (the classifier) are dropped. A two-tower
  checkpoint's image tower ("params/img/...") is taken. big_vision's MLP
  uses nn.gelu (tanh approximation) and LayerNorm epsilon 1e-6.
  """
  # pylint: disable-next=import-outside-toplevel
  from mmjax.models.siglip import (_BV_MAP, _BV_MLP, _bv_blocks, _bv_rename,
                                   _recover_tree)
  tree = _recover_tree(flat)
  if "params" in tree:
    tree = tree["params"]
  elif "opt" in tree:
    tree = tree["opt"]["target"]
  if "img" in tree:
    tree = tree["img"]
  tree = jax.tree.map(lambda a: np.asarray(a, dtype),
                      _renumber_pre_linen(tree))
  tree = dict(tree)
  transformer = dict(tree.pop("Transformer", {}))
  if "posembed_input" in transformer:
    transformer["pos_embedding"] = transformer.pop("posembed_input")[
        "pos_embedding"]
  blocks, transformer = _bv_blocks(transformer, "Transformer", "block_")
  if not blocks:
    raise ValueError("big_vision checkpoint: no Transformer/encoderblock_0")
  posemb = transformer.pop("pos_embedding", None)
  if posemb is None:
    posemb = tree.pop("pos_embedding")
    if "cls" in tree:  # added before the class token: it gets none
      posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], 1)
  params = {"embedding": tree.pop("embedding")}
  pool = "gap"
  if "cls" in tree:
    params["cls"], pool = tree.pop("cls"), "cls"
  params["pos_embedding"] = posemb
  params.update(blocks)
  params["encoder_norm"] = transformer.pop("encoder_norm")
  if "MAPHead_0" in tree:
    head = _bv_rename(tree.pop("MAPHead_0"), _BV_MAP, "MAPHead_0")
    head["mlp"] = _bv_rename(head["mlp"], _BV_MLP, "MAPHead_0/MlpBlock_0")
    params["map_head"], pool = head, "map" if pool == "gap" else "both"
  if pool == "both":
    raise ValueError("big_vision checkpoint: both cls and MAPHead_0")
  for key in ("head", "pre_logits"):
    tree.pop(key, None)
  left = next(iter(tree), None) or next(iter(transformer), None)
  if left:
    raise ValueError(f"big_vision checkpoint: {left} has no place in the ViT")
  kernel = params["embedding"]["kernel"]
  width = kernel.shape[-1]
  kwargs = dict(width=width, depth=len(blocks),
                mlp_dim=blocks["block_0"]["mlp"]["dense_0"]["kernel"].shape[-1],
                num_heads=int(blocks["block_0"]["attention"]["query"][
                    "kernel"].shape[1]),
                patch_size=kernel.shape[0], pool=pool, posemb="learn",
                pre_norm=False, patch_bias="bias" in params["embedding"],
                activation="gelu_tanh", layer_norm_epsilon=1e-6)
  return kwargs, params


def load_vit(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """(ViT kwargs, params) of a big_vision / AugReg `.npz` (a path ending in
  .npz) or of a timm checkpoint (a directory or .safetensors file)."""
  if str(path).endswith(".npz"):
    return load_big_vision_vit(path)
  return load_timm_vit(path)


def load_big_vision_vit(path: str | os.PathLike, dtype=np.float32
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Loads a big_vision / AugReg ViT .npz (`convert_big_vision_vit`).

  Returns:
    (kwargs, params) for `ViT(**kwargs)`.

  Raises:
    ValueError: naming what ViT cannot represent or the first parameter
      that does not fit.
  """
  with np.load(path, allow_pickle=False) as loaded:
    kwargs, params = convert_big_vision_vit(dict(loaded), dtype)
  patches = params["pos_embedding"].shape[1] - (kwargs["pool"] == "cls")
  side = kwargs["patch_size"] * int(round(patches**0.5))
  expected = param_shapes(ViT(**kwargs),
                          jax.ShapeDtypeStruct((1, side, side, 3),
                                               jnp.float32), train=False)
  check_fits(params, expected, f"the ViT of {path}")
  return kwargs, params


def _grid_side(tokens: int) -> int | None:
  side = int(round(tokens**0.5))
  return side if side * side == tokens else None


def resample_posemb(posemb: np.ndarray, positions: int) -> np.ndarray:
  """A learned position embedding [1, N, D] resampled to [1, positions, D],
  for a ViT at another image size than its checkpoint's (big_vision's
  `resample_posemb`, Dosovitskiy et al. 2021 section 3.2): a leading class
  token's row is kept; the square grid of the others is resized by bilinear
  interpolation (scipy.ndimage.zoom, order 1). ValueError if either count
  is not a square grid, with or without one class token."""
  n = posemb.shape[1]
  for extra in (0, 1):
    old, new = _grid_side(n - extra), _grid_side(positions - extra)
    if old and new:
      break
  else:
    raise ValueError(f"pos_embedding: cannot resample {n} positions to "
                     f"{positions} (neither is a square grid with the same "
                     "class token)")
  import scipy.ndimage  # pylint: disable=import-outside-toplevel
  grid = np.asarray(posemb[0, extra:], np.float64).reshape(old, old, -1)
  grid = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  return np.concatenate(
      [np.asarray(posemb[0, :extra], np.float64),
       grid.reshape(new * new, -1)])[None].astype(posemb.dtype)


def fit_posembs(target: Mapping[str, Any], loaded: Mapping[str, Any]
                ) -> Mapping[str, Any]:
  """`loaded` (a parameter tree) with every "pos_embedding" [1, N, D] whose
  N differs from `target`'s at the same path resampled to the target's
  (`resample_posemb`); the rest unchanged."""
  if not isinstance(loaded, Mapping) or not isinstance(target, Mapping):
    return loaded
  out = {}
  for key, value in loaded.items():
    old = target.get(key)
    if (key == "pos_embedding" and old is not None and np.ndim(value) == 3
        and np.shape(old)[0::2] == np.shape(value)[0::2]
        and np.shape(old)[1] != np.shape(value)[1]):
      value = resample_posemb(np.asarray(value), np.shape(old)[1])
    elif isinstance(value, Mapping):
      value = fit_posembs(old if isinstance(old, Mapping) else {}, value)
    out[key] = value
  return out
