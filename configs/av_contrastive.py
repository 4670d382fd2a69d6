"""Audio-image contrastive learning on spoken and handwritten digit pairs.

Command:
  python -m mmjax.train --config configs/av_contrastive.py --workdir /tmp/av_contrastive
  python -m mmjax.evaluate --config configs/av_contrastive.py --workdir /tmp/av_contrastive

Arguments (comma list after the colon):
  objective=NAME  softmax (CLIP/ALIGN, default), sigmoid (SigLIP) or
                  sigmoid_ring (SigLIP blockwise around the devices).
  smoke           a complete run in under 2 minutes on 2 CPU cores.
  seed=N          the run's seed.
  steps=N         training steps (default 300 of 128 pairs, 0.7 epoch).
  batch=N         batch size (default 128): the number of in-batch negatives.
  examples=N      train on N pairs in all, steps = N // batch (overrides
                  steps), so that batch sizes compare at equal data
                  (experiments/contrastive_batch).

Data: `avmnist/clean`, FSDD recordings (raw waveform, log-mel in the model)
paired with MNIST images of the same digit, MultiBench pairing; test pairs use
unseen takes. Two towers, LeNet each (the MultiBench AV-MNIST encoders), a
linear projection to a shared 64-d space, no labels used in training.

Evaluation on test: zero-shot digit accuracy, each spoken digit classified
by its nearest class prototype (the mean image embedding per digit);
audio<->image pair retrieval R@1/5/10 (the exact partner among all 10,000
pairs: chance R@1 is 1e-4, and 1e-3 within the right digit); and a linear
probe (ridge regression) on the frozen audio embeddings, fit on train.

Expected result and runtime: see README "Contrastive results".
"""

import ml_collections

from mmjax.configs import common

IMAGE_LENET = {"name": "lenet", "features": 6, "extra_layers": 3}
AUDIO_LENET = {"name": "lenet", "features": 6, "extra_layers": 5,
               "frontend": {"name": "logmel", "sample_rate": 8000,
                            "n_fft": 256, "hop_length": 64, "n_mels": 64}}


def get_config(arg=None):
  args = common.parse_arg(arg, objective="softmax", smoke=False, seed=0, steps=300,
                   batch=128, examples=0)
  config = ml_collections.ConfigDict()
  config.seed = args.seed

  # Data.
  common.set_data(config, "avmnist/clean", modalities=("image", "audio"), eval_splits=("test",), audio_length=8000)
  config.evaluators = {
      "zero_shot": {"modality": "audio", "prototypes_from": "image"},
      "retrieval": {"query": "audio", "target": "image"},
      "linear_probe": {"modality": "audio", "train_split": "train"},
  }

  # Model.
  config.objective = args.objective
  config.model = ml_collections.ConfigDict()
  config.model.encoders = {"image": IMAGE_LENET, "audio": AUDIO_LENET}
  config.model.embed_dim = 64
  config.frozen = ""  # regex over parameter paths never updated (LiT)

  # Optimisation, parallelism, logging and checkpoints.
  steps = args.examples // args.batch if args.examples else args.steps
  common.set_training(config, batch_size=args.batch, steps=steps, smoke=args.smoke)
  if args.smoke:
    config.eval_splits = ("val",)
    config.evaluators.linear_probe.train_split = "val"
  return config
