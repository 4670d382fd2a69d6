"""LiT from a CLIP, SigLIP or ViT checkpoint: the loaded image tower locked,
the text tower trained, on coco_mini's photos and captions.

Commands (one checkpoint argument; the tiny randomly initialised ones in
tests/data were built locally by tests/data/make_clip_fixtures.py and
make_siglip_fixtures.py):
  python -m mmjax.train --config configs/lit.py:clip=DIR --workdir /tmp/lit
  python -m mmjax.train --config configs/lit.py:siglip=PATH --workdir /tmp/lit
  python -m mmjax.train --config configs/lit.py:vit=PATH --workdir /tmp/lit
  python -m mmjax.evaluate --config configs/lit.py:siglip=PATH --workdir /tmp/lit

(configs/lit_clip.py:clip=DIR is the first.) On image-text shards in
img2dataset's layout (`mmjax.data.webdataset`) add
"--config.dataset=wds:/data/shards/{split}/{00000..01023}.tar". On a
connected machine, a published checkpoint (e.g. `huggingface-cli download
google/siglip-base-patch16-224 --local-dir DIR`); coco_mini's 64 px images
are resized to the checkpoint's size (config.image_size follows it).

Arguments (comma list after the colon):
  clip=DIR        a Hugging Face CLIPModel or open_clip directory
                  (`mmjax.models.clip`): architecture, weights, tokenizer
                  (DIR/tokenizer.json).
  siglip=PATH     a Hugging Face SiglipModel directory or a big_vision
                  two-tower .npz (`mmjax.models.siglip`); the tokenizer is
                  the directory's spiece.model (`SiglipTokenizer`, needs
                  `pip install sentencepiece`); a .npz ships none, so give
                  tokenizer=siglip:SPIECE_MODEL.
  vit=PATH        a timm ViT (directory or .safetensors) or big_vision /
                  AugReg .npz (`mmjax.models.vit_checkpoints`) into
                  tower_image/encoder, no image projection (the embedding
                  is the ViT's output, of its width); the text tower a
                  bidirectional TextTransformer of that width read at the
                  last position (text_layers deep), from scratch.
  text=WHICH      checkpoint (default for clip and siglip: the text tower
                  starts from the checkpoint) or scratch (random
                  initialisation, LiT's from-scratch arm; always for vit).
  tokenizer=NAME  a config.text.tokenizer name (default: the checkpoint's;
                  "bytes" for vit).
  text_layers=N   the vit text tower's depth (default 2).
  objective=NAME  softmax, sigmoid or sigmoid_ring (default: sigmoid for
                  siglip, softmax otherwise).
  smoke           a complete run in under 2 minutes on 2 CPU cores.
  seed=N, steps=N the run's seed and training steps (default 100).

Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning", CVPR
2022: the image tower (encoder and any projection, "tower_image/.*") keeps
the checkpoint's weights and gets no gradients; the text tower and the
temperature (and SigLIP's bias) train contrastively. SigLIP's text rows
are padded to the checkpoint's full context (its tower reads the last
position), CLIP's cut to 32. Test: retrieval R@1/5/10 over the 20 coco_mini
test images and their 100 captions (text->image chance R@1 5%).

Measured on a 2-core CPU machine, the default 100 steps (batch 32); the
fixtures are randomly initialised, so the figures sit at chance (text->image
5/25/50%) and only show the machinery end to end:
  siglip=tests/data/siglip_tiny_hf  text->image R@1/5/10 0.05/0.30/0.53,
                                    image->text 0.05/0.30/0.60; 12 s
                                    (9 s in the run)
  vit=tests/data/timm_vit_tiny      text->image R@1/5/10 0.10/0.27/0.48,
                                    image->text 0.10/0.10/0.35; 12 s
                                    (10 s in the run)
"""

import pathlib

import ml_collections

from mmjax import configs
from mmjax.configs import common
from mmjax.errors import UsageError

SOURCES = ("clip", "siglip", "vit")
BIG_VISION_MEAN = BIG_VISION_STD = (0.5, 0.5, 0.5)  # value_range(-1, 1)


def _checkpoint_error(key, e):
  return UsageError(f"config argument '{key}': {e}")


def clip_towers(path: str) -> dict:
  """{"model", "image_size", "max_length", "tokenizer", "inits"} of a CLIP
  checkpoint."""
  from mmjax.models.clip_config import clip_config  # pylint: disable=import-outside-toplevel
  checkpoint = clip_config(path)
  return {**checkpoint, "tokenizer": f"clip:{path}",
          "max_length": min(32, checkpoint["max_length"]),
          "inits": ("log_scale",), "objective": "softmax"}


def siglip_towers(path: str) -> dict:
  """The same of a SigLIP checkpoint (Hugging Face or big_vision)."""
  from mmjax.models import siglip  # pylint: disable=import-outside-toplevel
  checkpoint = siglip.siglip_config(path)
  spiece = pathlib.Path(path)
  spiece = spiece if spiece.is_dir() else spiece.parent
  tokenizer = (f"siglip:{spiece}" if (spiece / "spiece.model").is_file()
               else None)
  return {**checkpoint, "tokenizer": tokenizer,
          "inits": ("log_scale", "bias"), "objective": "sigmoid"}


def vit_towers(path: str, tokenizer: str, layers: int) -> dict:
  """A locked ViT image tower and a TextTransformer text tower of its width
  (vocabulary from `tokenizer`)."""
  # pylint: disable=import-outside-toplevel
  from mmjax.data.pipeline import text_tokenizer
  from mmjax.models import vit_checkpoints
  kwargs, params = vit_checkpoints.load_vit(path)
  if str(path).endswith(".npz"):
    patches = params["pos_embedding"].shape[1] - (kwargs["pool"] == "cls")
    side = kwargs["patch_size"] * int(round(patches**0.5))
    mean, std = BIG_VISION_MEAN, BIG_VISION_STD
  else:
    pre = vit_checkpoints.timm_preprocessing(path)
    side, mean, std = pre["image_size"], pre["mean"], pre["std"]
  length = 32
  probe = ml_collections.ConfigDict(
      {"text": {"tokenizer": tokenizer, "max_length": length}})
  width = kwargs["width"]
  text = dict(name="text_transformer", vocab_size=text_tokenizer(
      probe).vocab_size, width=width, num_layers=layers,
              num_heads=kwargs["num_heads"], mlp_dim=4 * width,
              max_length=length, causal=False, pool="last",
              activation="gelu", layer_norm_epsilon=1e-6)
  image = dict(name="vit", **kwargs,
               frontend=dict(name="pixels", mean=list(mean), std=list(std)))
  return {"model": {"encoders": {"image": image, "text": text},
                    "projections": {"image": "none", "text": "dense"},
                    "embed_dim": width},
          "image_size": int(side), "max_length": length,
          "tokenizer": tokenizer, "objective": "softmax",
          "inits": (), "image_init": "tower_image/encoder"}


def get_config(arg=None, *, name="configs/lit.py", sources=SOURCES):
  args = common.parse_arg(arg, clip=None, siglip=None, vit=None, text=None,
                          tokenizer=None, text_layers=2, objective=None,
                          smoke=False, seed=0, steps=100)
  given = [s for s in sources if args.get(s)]
  if len(given) != 1:
    raise UsageError(f"{name} needs " + " or ".join(
        f"{s}={'DIR' if s == 'clip' else 'PATH'}" for s in sources)
                     + (", a checkpoint" if len(sources) > 1 else
                        ", a CLIP checkpoint directory")
                     + (f" (one, got {', '.join(given)})" if given else ""))
  source, path = given[0], args.get(given[0])
  text = args.text or ("scratch" if source == "vit" else "checkpoint")
  configs.check_choice("config argument text", text,
                       ("checkpoint", "clip", "scratch")
                       if source == "clip" else ("checkpoint", "scratch"))
  if source == "vit" and text != "scratch":
    raise UsageError("config argument text: a ViT checkpoint has no text "
                     "tower (text=scratch)")
  try:
    if source == "clip":
      towers = clip_towers(path)
    elif source == "siglip":
      towers = siglip_towers(path)
    else:
      towers = vit_towers(path, args.tokenizer or "bytes", args.text_layers)
  except (OSError, ValueError) as e:
    raise _checkpoint_error(source, e) from e
  tokenizer = args.tokenizer or towers["tokenizer"]
  if tokenizer is None:
    raise UsageError(f"config argument 'siglip': {path} ships no "
                     "spiece.model; give tokenizer=siglip:SPIECE_MODEL")

  config = ml_collections.ConfigDict()
  config.seed = args.seed
  # Data: coco_mini at the checkpoint's image size, its own tokenizer.
  common.set_data(config, "coco_mini", modalities=("image", "text"),
                  eval_splits=("test",))
  config.image_size = towers["image_size"]
  config.text = ml_collections.ConfigDict()
  config.text.tokenizer = tokenizer
  config.text.max_length = towers["max_length"]
  config.text.captions_key = "captions"
  config.text.num_captions = 5
  config.evaluators = {"retrieval": {"query": "text", "target": "image"}}

  # Model: the checkpoint's towers; the image tower locked.
  config.objective = args.objective or towers["objective"]
  config.model = ml_collections.ConfigDict(towers["model"])
  image_init = towers.get("image_init", "tower_image")
  inits = (image_init,) + towers["inits"] + (
      ("tower_text",) if text != "scratch" else ())
  config.model.init = {p: f"{source}:{path}" for p in inits}
  config.frozen = "tower_image/.*"

  # Optimisation, parallelism, logging and checkpoints.
  common.set_training(config, batch_size=32, steps=args.steps,
                      smoke=args.smoke, log_every=20, eval_batch_size=20)
  config.optimizer.learning_rate = 1e-4
  return config
