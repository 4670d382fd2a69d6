"""What a CLIP checkpoint's config says, as mmjax configuration (no jax:
config files call it; the loader is `mmjax.models.clip`).

`clip_config(directory)` reads a Hugging Face config.json (model_type
"clip") or an open_clip open_clip_config.json and returns the encoder specs,
projections, embed_dim, image size and text context of the equivalent
`ContrastiveModel`; what the mmjax modules cannot represent is refused with
a ValueError naming the config key.
"""

from collections.abc import Mapping
import json
import os
import pathlib
from typing import Any

# CLIP's pixel statistics (Radford et al. 2021; OpenAI's `clip` package and
# Hugging Face's CLIPImageProcessor), RGB, of pixels scaled to [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Hugging Face hidden_act -> mmjax.models.layers.ACTIVATIONS.
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu",
                  "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}

# CLIPTextConfig's and CLIPVisionConfig's defaults, for config.json files
# that leave keys out.
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512,
                      intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5,
                      eos_token_id=49407)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072,
                        num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5)

HF_FILES = ("config.json", "model")
OPEN_CLIP_FILES = ("open_clip_config.json", "open_clip_model")


def hf_activation(name: str, key: str) -> str:
  """The `ACTIVATIONS` name of a Hugging Face hidden_act (ValueError naming
  the config `key` for one the modules lack)."""
  if name not in HF_ACTIVATIONS:
    raise ValueError(f"config.json: {key}={name!r} is not supported "
                     f"(known: {', '.join(HF_ACTIVATIONS)})")
  return HF_ACTIVATIONS[name]


def hf_tower_configs(hf_config: Mapping[str, Any], model_type: str,
                     text_defaults: Mapping[str, Any],
                     vision_defaults: Mapping[str, Any]
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(text_config, vision_config) of a Hugging Face two-tower config.json
  of `model_type` ("clip", "siglip"), each over its defaults (the keys a
  file leaves out). ValueError for another model_type or non-RGB images."""
  if hf_config.get("model_type") != model_type:
    raise ValueError(f"config.json: model_type "
                     f"{hf_config.get('model_type')!r} is not '{model_type}'")
  text = {**text_defaults, **hf_config.get("text_config", {})}
  vision = {**vision_defaults, **hf_config.get("vision_config", {})}
  if vision["num_channels"] != 3:
    raise ValueError("config.json: vision_config.num_channels="
                     f"{vision['num_channels']} (the pixel front end is RGB)")
  return text, vision


def hf_clip_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """The mmjax model configuration of a Hugging Face CLIP config.json.

  Returns:
    {"model": {"encoders": {"image": ViT spec with a "pixels" front end,
    "text": TextTransformer spec}, "projections": both "linear",
    "embed_dim": projection_dim}, "image_size": the ViT's input side,
    "max_length": the text context}.

  Raises:
    ValueError: naming the config key the modules cannot represent.
  """
  text, vision = hf_tower_configs(hf_config, "clip", _TEXT_DEFAULTS,
                                  _VISION_DEFAULTS)
  eos = text["eos_token_id"]
  image = dict(
      name="vit", width=vision["hidden_size"],
      depth=vision["num_hidden_layers"], mlp_dim=vision["intermediate_size"],
      num_heads=vision["num_attention_heads"],
      patch_size=vision["patch_size"], pool="cls", posemb="learn",
      pre_norm=True, patch_bias=False,
      activation=hf_activation(vision["hidden_act"], "vision_config.hidden_act"),
      layer_norm_epsilon=vision["layer_norm_eps"],
      frontend=dict(name="pixels", mean=list(CLIP_MEAN), std=list(CLIP_STD)))
  text_spec = dict(
      name="text_transformer", vocab_size=text["vocab_size"],
      width=text["hidden_size"], num_layers=text["num_hidden_layers"],
      num_heads=text["num_attention_heads"],
      mlp_dim=text["intermediate_size"],
      max_length=text["max_position_embeddings"], causal=True, pool="eos",
      # Hugging Face reads the largest id where eos_token_id is the legacy
      # 2 (OpenAI's checkpoints), else the first eos_token_id.
      eos_id=None if eos == 2 else eos,
      activation=hf_activation(text["hidden_act"], "text_config.hidden_act"),
      layer_norm_epsilon=text["layer_norm_eps"])
  return {"model": {"encoders": {"image": image, "text": text_spec},
                    "projections": {"image": "linear", "text": "linear"},
                    "embed_dim": hf_config.get("projection_dim", 512)},
          "image_size": vision["image_size"],
          "max_length": text["max_position_embeddings"]}


# open_clip model_cfg keys whose non-default values the modules lack.
_OPEN_CLIP_UNSUPPORTED = {
    "vision_cfg": {"ls_init_value": None, "attentional_pool": False,
                   "no_ln_pre": False, "pos_embed_type": "learnable",
                   "final_ln_after_pool": False, "pool_type": "tok",
                   "timm_model_name": None, "qk_norm": False,
                   "block_type": None, "act_kwargs": None,
                   "norm_kwargs": None},
    "text_cfg": {"ls_init_value": None, "embed_cls": False,
                 "no_causal_mask": False, "final_ln_after_pool": False,
                 "pool_type": "argmax", "proj_bias": False,
                 "proj_type": "linear", "hf_model_name": None,
                 "qk_norm": False, "block_type": None, "act_kwargs": None,
                 "norm_kwargs": None},
}


def open_clip_hf_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """An open_clip `model_cfg` (open_clip_config.json) as the Hugging Face
  CLIP config.json it is equivalent to (open_clip's defaults filled in:
  head width 64, MLP ratio 4, exact GELU unless quick_gelu, LayerNorm
  epsilon 1e-5, text read at the largest id).

  Raises:
    ValueError: naming the model_cfg key the modules cannot represent.
  """
  vision = dict(model_cfg.get("vision_cfg", {}))
  text = dict(model_cfg.get("text_cfg", {}))
  for part, cfg in (("vision_cfg", vision), ("text_cfg", text)):
    for key, default in _OPEN_CLIP_UNSUPPORTED[part].items():
      if key in cfg and cfg[key] != default:
        raise ValueError(f"open_clip_config.json: model_cfg.{part}.{key}="
                         f"{cfg[key]!r} is not supported")
  if not isinstance(vision.get("layers", 12), int):
    raise ValueError("open_clip_config.json: model_cfg.vision_cfg.layers="
                     f"{vision['layers']!r} (a ResNet tower) is not supported")
  if model_cfg.get("custom_text"):
    raise ValueError("open_clip_config.json: model_cfg.custom_text is not "
                     "supported")
  act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
  v_width, t_width = vision.get("width", 768), text.get("width", 512)
  return {
      "model_type": "clip", "projection_dim": model_cfg.get("embed_dim", 512),
      "vision_config": dict(
          hidden_size=v_width, num_hidden_layers=vision.get("layers", 12),
          intermediate_size=int(v_width * vision.get("mlp_ratio", 4.0)),
          num_attention_heads=v_width // vision.get("head_width", 64),
          image_size=vision.get("image_size", 224),
          patch_size=vision.get("patch_size", 16), hidden_act=act,
          layer_norm_eps=1e-5),
      "text_config": dict(
          vocab_size=text.get("vocab_size", 49408), hidden_size=t_width,
          num_hidden_layers=text.get("layers", 12),
          num_attention_heads=text.get("heads", 8),
          intermediate_size=int(t_width * text.get("mlp_ratio", 4.0)),
          max_position_embeddings=text.get("context_length", 77),
          hidden_act=act, layer_norm_eps=1e-5, eos_token_id=2)}


def checkpoint_format(directory: pathlib.Path) -> tuple[str, str]:
  for files in (HF_FILES, OPEN_CLIP_FILES):
    if (directory / files[0]).is_file():
      return files
  raise FileNotFoundError(
      f"{directory} is not a CLIP checkpoint: it has neither config.json "
      "(Hugging Face CLIPModel) nor open_clip_config.json (open_clip)")


def clip_config(directory: str | os.PathLike) -> dict[str, Any]:
  """The mmjax configuration of the CLIP checkpoint in `directory`
  (`hf_clip_config`), from its config.json or open_clip_config.json."""
  directory = pathlib.Path(directory)
  config_name, _ = checkpoint_format(directory)
  raw = json.loads((directory / config_name).read_text())
  if config_name == OPEN_CLIP_FILES[0]:
    raw = open_clip_hf_config(raw.get("model_cfg", raw))
  return hf_clip_config(raw)
