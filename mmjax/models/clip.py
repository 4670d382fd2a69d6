"""Pretrained CLIP towers, converted without torch.

Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021. A CLIP is a `ContrastiveModel` whose image tower is
a `ViT` (class token, CLIP's `ln_pre` as `pre_norm`, a bias-free patch
embedding, QuickGELU) and whose text tower is a causal `TextTransformer`
read at the end token; both projections are bias-free ("linear") and the
learned temperature is the model's `log_scale`. Two checkpoint formats load:

  Hugging Face `CLIPModel`: a directory with config.json (model_type "clip")
    and model.safetensors (or its shards), tokenizer.json for the tokenizer.
  open_clip: a directory with open_clip_config.json ({"model_cfg": ...}, as
    open_clip's Hugging Face Hub exports write it) and
    open_clip_model.safetensors.

`clip_config(directory)` (`mmjax.models.clip_config`, which needs no jax,
so config files may call it) gives the mmjax model configuration (encoder
specs, projections, embed_dim, image size), to put in `config.model`;
`load_clip(directory)` the parameters of the whole `ContrastiveModel` tree
({"tower_image": ..., "tower_text": ..., "log_scale": ...}), of which
`config.model.init` entries "clip:DIR" take the subtree at their path:

  config.model.update(clip_config(DIR)["model"])
  config.model.init = {"tower_image": "clip:DIR", "tower_text": "clip:DIR",
                       "log_scale": "clip:DIR"}
  config.text.tokenizer = "clip:DIR"        # tokenizer.json (HF format)

Mapping (Hugging Face names; open_clip's are renamed to these first):

  vision_model.embeddings.patch_embedding [D, C, p, p]   image encoder
      embedding/kernel [p, p, C, D]; class_embedding [D] cls [1, 1, D];
      position_embedding [N + 1, D] pos_embedding [1, N + 1, D]
  vision_model.pre_layrnorm, post_layernorm     norm_pre, encoder_norm
  *.encoder.layers.<i>.layer_norm1, layer_norm2  block_<i> / layer_<i>
      norm_attention, norm_mlp
  *.self_attn.{q,k,v}_proj [D, D]              attention/{query,key,value}
      kernel [D, H, D/H], bias [H, D/H]; out_proj -> out [H, D/H, D]
  *.mlp.fc1, fc2                                mlp/dense_0, dense_1
  text_model.embeddings.token_embedding, position_embedding   text encoder
      token_embedding/embedding, position_embedding [L, D]
  text_model.final_layer_norm                   norm_out
  visual_projection, text_projection [E, D]     tower_*/projection/kernel
  logit_scale []                                log_scale

What the modules cannot represent is refused with a ValueError naming the
config key (another activation, open_clip's layer scale, attentional or
average pooling, a text tower from Hugging Face or timm); a checkpoint
whose tensors do not fit its config names the first such parameter. Needs
only `safetensors`; torch is never imported. Parity with `CLIPModel` and
open_clip is checked in tests/test_clip.py.
"""

from collections.abc import Mapping
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import factory
from mmjax.models.clip_config import (OPEN_CLIP_FILES, checkpoint_format,
                                      clip_config)
from mmjax.models.contrastive import ContrastiveModel
from mmjax.models.convert import (check_fits, hf_checkpoint_state,
                                  load_safetensors, param_shapes,
                                  torch_attention, torch_dense, torch_norm)


def open_clip_to_hf(state: Mapping[str, Any]) -> dict[str, Any]:
  """open_clip CLIP tensors renamed (and fused q/k/v split) to `CLIPModel`'s.

  "visual.conv1.weight" -> "vision_model.embeddings.patch_embedding.weight",
  "transformer.resblocks.<i>.attn.in_proj_weight" [3D, D] -> the text
  model's q_proj, k_proj and v_proj, "visual.proj" [D, E] ->
  "visual_projection.weight" [E, D], and so on. Buffers (attn_mask) are
  dropped; a tensor with no counterpart is kept under its own name, for
  the fit check to report.
  """
  out = {}
  towers = (("visual.transformer.resblocks.", "vision_model.encoder.layers."),
            ("transformer.resblocks.", "text_model.encoder.layers."))
  renames = {
      "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
      "visual.class_embedding": "vision_model.embeddings.class_embedding",
      "visual.positional_embedding":
          "vision_model.embeddings.position_embedding.weight",
      "visual.ln_pre": "vision_model.pre_layrnorm",
      "visual.ln_post": "vision_model.post_layernorm",
      "token_embedding.weight":
          "text_model.embeddings.token_embedding.weight",
      "positional_embedding":
          "text_model.embeddings.position_embedding.weight",
      "ln_final": "text_model.final_layer_norm",
      "logit_scale": "logit_scale"}
  block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2",
           "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
           "mlp.c_proj": "mlp.fc2"}
  for name, value in state.items():
    if name == "attn_mask" or name.endswith(".attn_mask"):
      continue
    if name in ("visual.proj", "text_projection"):
      target = ("visual_projection" if name == "visual.proj"
                else "text_projection")
      out[f"{target}.weight"] = np.asarray(value).T
      continue
    prefix = next(((o, h) for o, h in towers if name.startswith(o)), None)
    if prefix is not None:
      layer, _, rest = name[len(prefix[0]):].partition(".")
      base = f"{prefix[1]}{layer}."
      if rest.startswith("attn.in_proj_"):
        kind = rest[len("attn.in_proj_"):]  # weight or bias
        for proj, part in zip("qkv", np.split(np.asarray(value), 3, axis=0)):
          out[f"{base}self_attn.{proj}_proj.{kind}"] = part
        continue
      module, _, kind = rest.rpartition(".")
      out[base + f"{block.get(module, module)}.{kind}"] = value
      continue
    module, _, kind = name.rpartition(".")
    if name in renames:
      out[renames[name]] = value
    elif module in renames:
      out[f"{renames[module]}.{kind}"] = value
    else:
      out[name] = value
  return out


def _attention(state, name, num_heads):
  """CLIP's q/k/v/out_proj Linears as nn.MultiHeadDotProductAttention's."""
  projections = [f"{name}.{p}_proj" for p in "qkv"]
  return torch_attention([state[f"{p}.weight"] for p in projections],
                         [state[f"{p}.bias"] for p in projections],
                         torch_dense(state, f"{name}.out_proj"), num_heads)


def encoder_blocks(state, prefix, count, num_heads, ours):
  """`count` CLIP encoder layers at `prefix` as {ours<i>: TransformerBlock}."""
  blocks = {}
  for i in range(count):
    layer = f"{prefix}.encoder.layers.{i}"
    blocks[f"{ours}{i}"] = {
        "norm_attention": torch_norm(state, f"{layer}.layer_norm1"),
        "attention": _attention(state, f"{layer}.self_attn", num_heads),
        "norm_mlp": torch_norm(state, f"{layer}.layer_norm2"),
        "mlp": {"dense_0": torch_dense(state, f"{layer}.mlp.fc1"),
                "dense_1": torch_dense(state, f"{layer}.mlp.fc2")}}
  return blocks


def text_transformer_params(state, spec) -> dict[str, Any]:
  """A Hugging Face CLIP or SigLIP `text_model` (embeddings, encoder layers,
  final_layer_norm) as the parameters of `TextTransformer(**spec)`."""
  return {
      "token_embedding": {"embedding": state[
          "text_model.embeddings.token_embedding.weight"]},
      "position_embedding": state[
          "text_model.embeddings.position_embedding.weight"],
      **encoder_blocks(state, "text_model", spec["num_layers"],
                       spec["num_heads"], "layer_"),
      "norm_out": torch_norm(state, "text_model.final_layer_norm")}


def convert_clip(state: Mapping[str, Any], config: Mapping[str, Any],
                 dtype=np.float32) -> dict[str, Any]:
  """`CLIPModel` tensors -> the `ContrastiveModel` parameter tree.

  Args:
    state: name -> array, Hugging Face names (module docstring).
    config: `hf_clip_config(...)`.
    dtype: dtype of the returned numpy arrays.

  Raises:
    ValueError: a tensor the model needs is missing, or one is left over.
  """
  state = hf_checkpoint_state(state, dtype)
  image, text = (config["model"]["encoders"][m] for m in ("image", "text"))
  embeddings = "vision_model.embeddings"
  width = image["width"]
  vit = {
      "embedding": {"kernel": np.transpose(
          state[f"{embeddings}.patch_embedding.weight"], (2, 3, 1, 0))},
      "cls": state[f"{embeddings}.class_embedding"].reshape(1, 1, width),
      "pos_embedding": state[f"{embeddings}.position_embedding.weight"][None],
      "norm_pre": torch_norm(state, "vision_model.pre_layrnorm"),
      **encoder_blocks(state, "vision_model", image["depth"],
                       image["num_heads"], "block_"),
      "encoder_norm": torch_norm(state, "vision_model.post_layernorm")}
  transformer = text_transformer_params(state, text)
  params = {
      "log_scale": state["logit_scale"].reshape(()),
      "tower_image": {"encoder": vit, "projection": torch_dense(
          state, "visual_projection", bias=False)},
      "tower_text": {"encoder": transformer, "projection": torch_dense(
          state, "text_projection", bias=False)}}
  state.check_all_read("the CLIP model of its config (more layers than "
                       "num_hidden_layers?)")
  return params


def build_clip(config: Mapping[str, Any]) -> ContrastiveModel:
  """The `ContrastiveModel` of `hf_clip_config(...)` (float32), whose
  parameter tree `convert_clip` fills (all but the sigmoid bias); also of
  `siglip.hf_siglip_config(...)`, which has the same keys."""
  model = config["model"]
  return factory.build_contrastive(
      modalities=("image", "text"), encoders=model["encoders"],
      embed_dim=model["embed_dim"],
      objective=model.get("objective", "softmax"),
      projections=model["projections"])


def load_clip(directory: str | os.PathLike,
              dtype=np.float32) -> tuple[dict[str, Any], dict[str, Any]]:
  """Loads a CLIP checkpoint directory (either format) without torch.

  Returns:
    (config, params): `clip_config(directory)` and the ContrastiveModel
    parameters ("log_scale", "tower_image", "tower_text") as numpy arrays.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: naming the config key the modules cannot represent, or the
      first parameter that does not fit the config.
  """
  directory = pathlib.Path(directory)
  config = clip_config(directory)
  _, stem = checkpoint_format(directory)
  state = load_safetensors(directory, stem)
  if stem == OPEN_CLIP_FILES[1]:
    state = open_clip_to_hf(state)
  params = convert_clip(state, config, dtype)
  side, length = config["image_size"], config["max_length"]
  expected = param_shapes(
      build_clip(config),
      {"image": jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32),
       "text": jax.ShapeDtypeStruct((1, length), jnp.int32)})
  expected.pop("bias")  # the sigmoid loss's; CLIP has none
  check_fits(params, expected, f"the CLIP model of {directory}")
  return config, params
