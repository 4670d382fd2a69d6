"""MNIST digit classification with a LeNet: digits_qa's pretrained cell encoder.

Command:
  python -m mmjax.train --config configs/mnist.py --workdir /tmp/mnist
  python -m mmjax.evaluate --config configs/mnist.py --workdir /tmp/mnist

Arguments (comma list after the colon):
  smoke   a complete run in under 2 minutes on 2 CPU cores.
  seed=N  the run's seed.
  steps=N training steps (default 860: 2 epochs of 55,000 in batches of 128).

Data: `mnist` (the repo's copy), trained on the first 55,000 training images
and validated on the last 5,000 ("train[55000:]"), tested on the 10,000 test
images: the same pools as digits_qa's train, val and test grids
(mmjax/data/builders/digits_qa.py), so a digits_qa model that starts from
this encoder has seen none of its val or test digits. Model: the LeNet of
digits_qa's `image=cells` (8 channels doubling over 4 convolutions with
BatchNorm, 28x28 -> one 64-d token) and a head with 100 hidden units.

Use: `configs/digits_qa.py:image=cells,cells=DIR` loads this run's
"encoder_image" into every cell's LeNet and locks it (the vision encoder
pretrained apart and frozen, as in Flamingo and PaLI's first stage).

Expected result: test accuracy about 98.5%; runtime about 1 minute on 2 CPU
cores (40 s on an AMD EPYC; README "Generation", experiments/digits_qa).
"""

import ml_collections

from mmjax.configs import common

CELL_LENET = {"name": "lenet", "features": 8, "extra_layers": 3}


def get_config(arg=None):
  args = common.parse_arg(arg, smoke=False, seed=0, steps=860)
  config = ml_collections.ConfigDict()
  config.seed = args.seed
  common.set_data(config, "mnist", modalities=("image",),
                  train_split="train[:55000]",
                  eval_splits=("train[55000:]", "test"))
  config.evaluators = {"classification": {}}
  config.model = ml_collections.ConfigDict()
  config.model.encoders = {"image": CELL_LENET}
  config.model.fusion = "concat"
  config.model.fusion_kwargs = {}
  config.model.head_hidden = (100,)
  config.model.num_classes = 10
  config.model.modality_dropout = {}
  config.model.missing = "zero"
  config.objective = "supervised"
  common.set_training(config, batch_size=128, steps=args.steps,
                      smoke=args.smoke, log_every=100, eval_batch_size=500)
  if args.smoke:
    config.eval_splits = ("test[:500]",)
  return config
