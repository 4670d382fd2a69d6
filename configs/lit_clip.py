"""LiT from a CLIP checkpoint: the loaded image tower locked, the text tower
tuned, on coco_mini's photos and captions.

Command (clip=DIR: a Hugging Face CLIPModel or open_clip checkpoint
directory, `mmjax.models.clip`; tests/data/clip_tiny_hf is a tiny randomly
initialised one built locally by tests/data/make_clip_fixtures.py):
  python -m mmjax.train --config configs/lit_clip.py:clip=DIR --workdir /tmp/lit
  python -m mmjax.evaluate --config configs/lit_clip.py:clip=DIR --workdir /tmp/lit

On image-text shards in img2dataset's layout (`mmjax.data.webdataset`):
  python -m mmjax.train --config configs/lit_clip.py:clip=DIR --workdir /tmp/lit \
      "--config.dataset=wds:/data/shards/{split}/{00000..01023}.tar"

On a connected machine, a published CLIP (e.g. `huggingface-cli download
openai/clip-vit-base-patch32 --local-dir DIR`); its 224 px images are
resized from coco_mini's 64 px (config.image_size follows the checkpoint).

Arguments (comma list after the colon):
  clip=DIR        the checkpoint (required): architecture, weights and
                  tokenizer (DIR/tokenizer.json).
  text=WHICH      clip (default: the text tower starts from the checkpoint)
                  or scratch (random initialisation, LiT's from-scratch arm).
  objective=NAME  softmax (default), sigmoid or sigmoid_ring.
  smoke           a complete run in under 2 minutes on 2 CPU cores.
  seed=N, steps=N the run's seed and training steps (default 100).

Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning", CVPR
2022: the image tower (encoder and projection, "tower_image/.*") keeps the
checkpoint's weights and gets no gradients; the text tower and the
temperature train contrastively. Test: retrieval R@1/5/10 over the 20
coco_mini test images and their 100 captions (text->image chance R@1 5%).
Expected result and runtime: see README "Pretrained checkpoints".
"""

import ml_collections

from mmjax import configs
from mmjax.configs import common
from mmjax.errors import UsageError
from mmjax.models.clip_config import clip_config


def get_config(arg=None):
  args = common.parse_arg(arg, clip=None, text="clip", objective="softmax",
                          smoke=False, seed=0, steps=100)
  if not args.clip:
    raise UsageError("configs/lit_clip.py needs clip=DIR, a CLIP checkpoint "
                     "directory")
  configs.check_choice("config argument text", args.text, ("clip", "scratch"))
  try:
    checkpoint = clip_config(args.clip)
  except (OSError, ValueError) as e:
    raise UsageError(f"config argument 'clip': {e}") from e
  config = ml_collections.ConfigDict()
  config.seed = args.seed

  # Data: coco_mini at the checkpoint's image size, its own tokenizer.
  common.set_data(config, "coco_mini", modalities=("image", "text"),
                  eval_splits=("test",))
  config.image_size = checkpoint["image_size"]
  config.text = ml_collections.ConfigDict()
  config.text.tokenizer = f"clip:{args.clip}"
  config.text.max_length = min(32, checkpoint["max_length"])
  config.text.captions_key = "captions"
  config.text.num_captions = 5
  config.evaluators = {"retrieval": {"query": "text", "target": "image"}}

  # Model: the checkpoint's towers; the image tower locked.
  config.objective = args.objective
  config.model = ml_collections.ConfigDict(checkpoint["model"])
  inits = ("tower_image", "log_scale") + (
      ("tower_text",) if args.text == "clip" else ())
  config.model.init = {path: f"clip:{args.clip}" for path in inits}
  config.frozen = "tower_image/.*"

  # Optimisation, parallelism, logging and checkpoints.
  common.set_training(config, batch_size=32, steps=args.steps,
                      smoke=args.smoke, log_every=20, eval_batch_size=20)
  config.optimizer.learning_rate = 1e-4
  return config
