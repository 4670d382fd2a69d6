"""AV-MNIST supervised fusion: MultiBench protocol, LeNet encoders.

Command:
  python -m mmjax.train --config configs/avmnist.py:fusion=concat --workdir /tmp/avmnist
  python -m mmjax.evaluate --config configs/avmnist.py:fusion=concat --workdir /tmp/avmnist

Arguments (comma list after the colon):
  fusion=NAME  one of image_only, audio_only, early, concat, late, weighted.
  clean        `avmnist/clean`: full images and raw waveforms, with the log-mel
               front end computed inside the model in JAX.
  smoke        a complete run (train, eval, checkpoint) in under 2 minutes on
               2 CPU cores.
  seed=N       the run's seed (init, shuffle).
  drop=P       modality dropout: each modality is removed from a training
               example with probability P (never both).
  steps=N      train for N steps instead of one epoch (430).
  multibench   MultiBench's own training recipe (`examples/multimedia/
               avmnist_simple_late_fusion.py`, `training_structures/
               Supervised_Learning.py`): batch 40, SGD learning rate 0.1
               without momentum, weight decay 1e-4 as an L2 gradient on every
               parameter (torch.optim.SGD's), the gradient's global norm
               clipped at 8, a constant rate, 30 epochs,
               validation every epoch and the test figures of the epoch with
               the best validation accuracy (`select_best`); the LeNets'
               convolutions start as MultiBench's (He uniform).
  epochs=N     with `multibench`: N epochs of 1,375 steps instead of 30.
  optimizer=NAME  adamw (AdamW 1e-3, the default) or sgd (SGD with momentum
               0.9, learning rate 0.01, weight decay 1e-4: OGM-GE's
               optimizer, and its default with imbalance=ogm_ge).
  image=NAME    image encoder: lenet (default), resnet (ResNet-18 v1.5, width
               16, CIFAR stem) or vit (4 layers, width 64, 7x7 patches).
  audio=NAME    audio encoder: lenet (default) or ast (4 layers, width 64;
               with `clean` its log-mel input is normalised by the training
               set's mean and std, as AST does; its representation is the
               mean of its [CLS] and distillation tokens, or with `grid` its
               patch tokens).
  latents=N    fusion=perceiver: the resampler's number of latents (8).
  fusion_layer=N  fusion=bottleneck: the first of its 4 layers that
               exchanges through the bottleneck tokens (2; 0 = early, 4 =
               late).
  grid         the LeNets skip their last pooling and give 3x3 = 9 tokens per
               modality (instead of one), for token-level fusions.
  probe        unimodal probe heads: a linear classifier per modality on its
               pooled encoder features behind `stop_gradient`, trained with
               weight 1 without changing the encoders; logs train and eval
               `unimodal/<m>/accuracy`, how linearly decodable each
               modality's representation is (mmjax/models/multimodal.py).
  linear_head  a linear fused head (`head_hidden=()`), the setting of the
               OGM-GE paper (concatenation, one FC layer).
  imbalance=M  a modality-imbalance method (mmjax/methods/):
               none (default);
               ogm_ge: OGM-GE (Peng et al., CVPR 2022), alpha 0.1, modulating
                 the first half of the steps like the official 0-50 of 100
                 epochs, scored by probe heads, or with `linear_head` (and
                 fusion=concat) exactly as the paper by the decomposed
                 linear head;
               gblend: online G-Blending (Wang et al., CVPR 2020) with aux
                 heads, weights re-estimated every 50 steps as the paper
                 does, by training each head alone for 10 steps from a copy
                 of the model, measured on 1000 val and 1000 train examples;
                 the aux heads take the place of `probe` (they report
                 `unimodal/<m>/accuracy` too).
               Options: --config.imbalance.ogm_ge.alpha=0.8 etc.

Reproduces: the AV-MNIST rows of MultiBench (Liang et al. 2021), LeNet image
and spectrogram encoders, an MLP head with 100 hidden units. The `avmnist`
audio is noisy by construction (see mmjax/data/builders/avmnist.py).

Expected result (test accuracy, default recipe, README "AV-MNIST results"):
image_only 64.5%, audio_only 43.2%, early 75.4%, concat 76.2%, late 76.7%,
weighted 77.1%; `clean,fusion=late,drop=0.3` 99.5% (3 seeds), `clean` concat
98.8%. The 14 fusions at `grid,steps=200`: experiments/fusion_zoo.
`multibench,epochs=3` (README "MultiBench's own recipe"): concat 80.5% test
(selected epoch 3, val 85.1%), audio_only 47.5%, image_only 63.9%; 758 s,
738 s and 96 s on an idle 2-core Intel Xeon. `multibench` (30 epochs):
image_only 64.7% (selected epoch 10, val 70.1%), 1211 s; concat 81.5%
(selected epoch 11, val 86.3%), 8818 s; on a 2-core AMD EPYC, partly
shared.
Runtime, measured on an idle 2-core AMD EPYC (CPU only): concat 434 s
(1.32 steps/s, first step 16.5 s after start), image_only 71 s, `smoke`
86 s and `clean,smoke` 74 s once the dataset is built (30 s for `avmnist`,
10 s for `avmnist/clean`, once per data directory).
"""

import ml_collections

from mmjax.configs import common
from mmjax.errors import UsageError

IMAGE_LENET = {"name": "lenet", "features": 6, "extra_layers": 3}
SPECTROGRAM_LENET = {"name": "lenet", "features": 6, "extra_layers": 5}
RESNET = {"name": "resnet", "depth": 18, "width": 16, "stem": "cifar"}
VIT = {"name": "vit", "width": 64, "depth": 4, "mlp_dim": 128, "num_heads": 4,
       "patch_size": 7, "pool": "none"}
AST = {"name": "ast", "width": 64, "depth": 4, "mlp_dim": 128, "num_heads": 4}
# AST normalises its input by (x - mean) / (2 std) with the training set's
# log-mel statistics (Gong et al. 2021): `avmnist/clean` train through LOGMEL,
# measured by `python tools/audio_norm_stats.py` (55,000 waveforms).
AST_CLEAN_NORM = {"norm_mean": -69.51, "norm_std": 24.36}
LOGMEL = {"name": "logmel", "sample_rate": 8000, "n_fft": 256,
          "hop_length": 64, "n_mels": 64}


def get_config(arg=None):
  args = common.parse_arg(arg, fusion="concat", clean=False, smoke=False, seed=0,
                   grid=False, drop=0.0, steps=430, image="lenet",
                   audio="lenet", probe=False, linear_head=False,
                   imbalance="none", latents=0, fusion_layer=-1,
                   optimizer="", multibench=False, epochs=30)
  config = ml_collections.ConfigDict()
  config.seed = args.seed

  # Data.
  common.set_data(config, "avmnist/clean" if args.clean else "avmnist", modalities=("image", "audio"), eval_splits=("val", "test"), audio_length=8000 if args.clean else 0)
  # mmjax/evaluators: accuracy and loss; accuracy with each modality removed.
  config.evaluators = {"classification": {}, "missing_modality": {}}

  # Model.
  config.model = ml_collections.ConfigDict()
  config.model.fusion = args.fusion
  image = {"lenet": dict(IMAGE_LENET, final_pool=not args.grid),
           "resnet": RESNET, "vit": VIT}.get(args.image)
  # AST's own representation is the mean of its [CLS] and distillation
  # tokens (pool "cls"); `grid` keeps its patch tokens for token fusions.
  audio = {"lenet": dict(SPECTROGRAM_LENET, final_pool=not args.grid),
           "ast": dict(AST, pool="none" if args.grid else "cls",
                       **(AST_CLEAN_NORM if args.clean else {}))
           }.get(args.audio)
  if image is None or audio is None:
    raise UsageError(f"config arguments image={args.image}, audio={args.audio}:"
                     " known image encoders lenet, resnet, vit; audio lenet, ast")
  audio = dict(audio)
  if args.clean:
    audio["frontend"] = LOGMEL
  config.model.encoders = {"image": image, "audio": audio}
  config.model.fusion_kwargs = ({"encoder": SPECTROGRAM_LENET}
                                if args.fusion == "early" else {})
  for name, value, unset, fusion, key in (
      ("latents", args.latents, 0, "perceiver", "num_latents"),
      ("fusion_layer", args.fusion_layer, -1, "bottleneck", "fusion_layer")):
    if value != unset:
      if args.fusion != fusion:
        raise UsageError(f"config argument {name} needs fusion={fusion}")
      config.model.fusion_kwargs = {key: value}
  config.model.head_hidden = () if args.linear_head else (100,)
  # Probability of removing each modality from a training example, and how a
  # missing modality reaches the fusion ("zero": masked out; "token": a
  # learned mask token).
  config.model.modality_dropout = {"image": args.drop, "audio": args.drop}
  config.model.missing = "zero"
  config.model.num_classes = 10
  # Unimodal heads: none, probe or aux (trained into the encoders,
  # G-Blending). OGM-GE with `linear_head` (and concat) scores each modality
  # with the linear concat head split by modality instead.
  if args.imbalance == "gblend":  # its aux heads also report, probe or not
    config.model.unimodal_heads = "aux"
  elif args.imbalance == "ogm_ge" and args.linear_head:
    config.model.unimodal_heads = "none"
  elif args.imbalance == "ogm_ge" or args.probe:
    config.model.unimodal_heads = "probe"
  else:
    config.model.unimodal_heads = "none"
  config.objective = "supervised"

  # Optimisation, parallelism, logging and checkpoints.
  common.set_training(config, batch_size=128, steps=args.steps,
                      smoke=args.smoke)
  # OGM-GE was designed with SGD (momentum 0.9, weight decay 1e-4, official
  # code): Adam's per-parameter normalisation undoes much of its gradient
  # scaling, so it trains with SGD unless optimizer= says otherwise.
  optimizer = args.optimizer or ("sgd" if args.imbalance == "ogm_ge"
                                 else "adamw")
  if optimizer not in ("adamw", "sgd"):
    raise UsageError(f"config argument optimizer={optimizer}: known adamw, "
                     "sgd")
  if optimizer == "sgd":
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.01
    config.optimizer.momentum = 0.9

  # Modality imbalance (mmjax/methods/): the method and its options.
  config.imbalance = ml_collections.ConfigDict()
  config.imbalance.method = args.imbalance  # none, ogm_ge or gblend
  # OGM-GE: k = 1 - tanh(alpha * rho) for the dominant modality at steps
  # start_step..end_step (end_step < 0: to the end; the default, half of
  # total_steps, follows --config.total_steps); noise: GE on (False: OGM
  # alone); conv_only: only the 4-D conv kernels, as the official code.
  config.imbalance.ogm_ge = {"alpha": 0.1, "start_step": 0,
                             "end_step": config.get_ref("total_steps") // 2,
                             "noise": True, "conv_only": False}
  # G-Blending: the held-out split and examples (and as many train examples)
  # measured every `every` steps (a super-epoch); min_overfit floors dO;
  # estimator "separate" (the paper's: each head trained alone from a copy
  # for estimate_steps) or "trajectory" (cheaper: along the joint run).
  config.imbalance.gblend = {"split": "val", "num_examples": 1000,
                             "every": 50, "min_overfit": 0.01,
                             "estimator": "separate", "estimate_steps": 10}
  if args.multibench:
    set_multibench_recipe(config, args.epochs, args.smoke)
  elif args.smoke:
    config.eval_splits = ("val",)
  return config


def set_multibench_recipe(config, epochs: int, smoke: bool):
  """MultiBench's AV-MNIST training: SGD 0.1, L2 1e-4, gradient norm
  clipped at 8, batch 40, an epoch of 55,000 / 40 = 1,375 steps, the best
  validation epoch's state; He-uniform LeNet convolutions."""
  config.batch_size = 40
  steps_per_epoch = 55_000 // config.batch_size
  config.total_steps = 40 if smoke else epochs * steps_per_epoch
  config.eval_every = 20 if smoke else steps_per_epoch
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.0
  config.optimizer.weight_decay = 1e-4
  config.optimizer.no_decay = ""  # torch decays every parameter
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip_norm = 8.0  # train(..., clip_val=8)
  config.select_best.metric = "eval/avmnist_val/classification/accuracy"
  for encoder in config.model.encoders.values():  # kaiming_uniform_
    if encoder.name == "lenet":
      encoder.kernel_init = "he_uniform"
