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
  text=WHICH      clip or checkpoint (default: the text tower starts from
                  the checkpoint) or scratch (random initialisation, LiT's
                  from-scratch arm).
  objective=NAME  softmax (default), sigmoid or sigmoid_ring.
  smoke           a complete run in under 2 minutes on 2 CPU cores.
  seed=N, steps=N the run's seed and training steps (default 100).

Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning", CVPR
2022: the image tower (encoder and projection, "tower_image/.*") keeps the
checkpoint's weights and gets no gradients; the text tower and the
temperature train contrastively. Test: retrieval R@1/5/10 over the 20
coco_mini test images and their 100 captions (text->image chance R@1 5%).
Expected result and runtime: see README "Pretrained checkpoints".

configs/lit.py (clip=DIR | siglip=PATH | vit=PATH) builds it; this file is
its clip=DIR form.
"""

import pathlib

from mmjax import configs

_LIT = configs.load_module(pathlib.Path(__file__).with_name("lit.py"))


def get_config(arg=None):
  return _LIT.get_config(arg, name="configs/lit_clip.py", sources=("clip",))
