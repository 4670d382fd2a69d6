"""Trimodal question answering on digits_qa: generative models and baselines.

Command:
  python -m mmjax.train --config configs/digits_qa.py:model=prefix \
      --workdir /tmp/digits_qa/prefix
  python -m mmjax.generate --config configs/digits_qa.py:model=prefix \
      --workdir /tmp/digits_qa/prefix --split test

  Flamingo's two stages (Alayrac et al. 2022): a text-only LM, then the
  frozen LM with a resampler and gated cross-attention trained on top:
  python -m mmjax.train --config configs/digits_qa.py:model=lm \
      --workdir /tmp/digits_qa/lm
  python -m mmjax.train --config configs/digits_qa.py:model=flamingo,lm=/tmp/digits_qa/lm \
      --workdir /tmp/digits_qa/flamingo

Arguments (comma list after the colon):
  model=NAME  generative (objective "captioning", answers decoded greedily):
                prefix           PaLI-style: image and audio tokens, then
                                 the question, as a full-attention prefix
                cross_attention  every decoder block cross-attends to them
                flamingo         gated xattn-dense blocks over a Perceiver
                                 resampler; with lm=DIR the decoder is that
                                 run's LM, frozen
                lm               the text-only LM (question -> answer) that
                                 flamingo freezes: the answer prior
              answer classifiers over the closed answer vocabulary
              (objective "supervised"):
                classifier       image, audio and question tokens fused by
                                 a multimodal bottleneck transformer (MBT,
                                 learned positions per modality, exchanging
                                 from its first layer), the tokens the
                                 generative models see
                image_question   the same without audio
                question_only    the question alone
  lm=DIR      flamingo: the workdir of a finished model=lm run.
  image=NAME  the image encoder: grid (default) an image LeNet keeping its
              7x7 grid of tokens; cells: the grid's four 28x28 cells each
              through one MNIST LeNet (configs/mnist.py's), a token per
              cell plus a learned cell embedding (`patches`).
  cells=DIR   image=cells: the workdir of a finished configs/mnist.py run,
              whose LeNet the cells start from, locked (the vision encoder
              pretrained apart, as in Flamingo and PaLI).
  registers=N  model=prefix or cross_attention: N learned tokens appended to
              the media, always valid (`GenerativeModel.registers`, attention
              sinks; on the large build they did not help counting:
              experiments/digits_qa); default 0.
  data=large  the `large` build: 60,000 training questions instead of
              20,000, the same val and test records (metrics are named
              eval/digits_qa_large_<split>/...).
  smoke       a complete run in under 2 minutes on 2 CPU cores.
  seed=N      the run's seed.
  steps=N     training steps (default 3000, 9.6 epochs of 20,000).

Data: `digits_qa` (mmjax/data/builders/digits_qa.py): a 2x2 grid of MNIST
digits [56, 56, 1], one FSDD spoken digit (int16, 6000 samples at 8 kHz,
log-mel in the model), a question and a short answer; 8 question families
needing the image, the audio or both; splits train 20,000 / val 1,000 /
test 2,000 / test_compositional 1,000 (held-out family x digit
combinations). Questions and answers are UTF-8 bytes (ByteTokenizer).
Encoders: an image LeNet keeping its 7x7 grid of tokens (or, with
image=cells, four cell tokens), a spectrogram LeNet (one token); for the classifiers a 2-layer byte-level BERT over the
question. Evaluation: `vqa`, exact-match accuracy per family.

Expected result and runtime: README "Generation" and
experiments/digits_qa.
"""

import pathlib

import ml_collections

from mmjax import configs
from mmjax.configs import common
from mmjax.errors import UsageError

_MNIST = configs.load_module(pathlib.Path(__file__).with_name("mnist.py"))

GENERATIVE = ("prefix", "cross_attention", "flamingo", "lm")
CLASSIFIERS = {"classifier": ("image", "audio", "text"),
               "image_question": ("image", "text"), "question_only": ("text",)}
# The digits_qa builder's ClassLabel names (mmjax.data.builders.digits_qa
# FAMILIES and ANSWERS; tests check that these stay equal).
FAMILIES = ("digit_at", "count", "sum", "compare", "spoken", "spoken_in_grid",
            "where_spoken", "spoken_plus")
ANSWERS = tuple(str(i) for i in range(19)) + (
    "yes", "no", "top left", "top right", "bottom left", "bottom right")

IMAGE = {"name": "lenet", "features": 8, "extra_layers": 3,
         "final_pool": False}  # 56 -> 7x7 tokens of 64 channels
# image=cells: each 28x28 cell through configs/mnist.py's LeNet, one token
# per cell with a learned cell embedding at the features' scale.
CELLS = {"name": "patches", "patch_size": 28,
         "patch": _MNIST.CELL_LENET, "position_std": 1.0}
CELL_ENCODER = "encoder_image/patch_encoder"  # its parameters in the model
AUDIO = {"name": "lenet", "features": 6, "extra_layers": 4,
         "frontend": {"name": "logmel", "sample_rate": 8000, "n_fft": 256,
                      "hop_length": 64, "n_mels": 64}}
QUESTION = {"name": "bert", "vocab_size": common.BYTE_VOCAB_SIZE,
            "hidden_size": 64, "num_layers": 2, "num_heads": 4,
            "intermediate_size": 128, "max_position_embeddings": 64}


def get_config(arg=None):
  args = common.parse_arg(arg, model="prefix", lm="", image="grid", cells="",
                          data="default", registers=0, smoke=False, seed=0,
                          steps=3000)
  if args.model not in GENERATIVE and args.model not in CLASSIFIERS:
    raise UsageError(f"config argument model={args.model}: known "
                     f"{', '.join(GENERATIVE + tuple(CLASSIFIERS))}")
  if args.image not in ("grid", "cells"):
    raise UsageError(f"config argument image={args.image}: grid or cells")
  if args.cells and args.image != "cells":
    raise UsageError("config argument cells needs image=cells")
  if args.data not in ("default", "large"):
    raise UsageError(f"config argument data={args.data}: default or large")
  if args.lm and args.model != "flamingo":
    raise UsageError("config argument lm needs model=flamingo")
  if args.registers and args.model not in ("prefix", "cross_attention"):
    raise UsageError("config argument registers needs model=prefix or "
                     "model=cross_attention")
  config = ml_collections.ConfigDict()
  config.seed = args.seed
  generative = args.model in GENERATIVE
  modalities = (() if args.model == "lm" else ("image", "audio")
                if generative else CLASSIFIERS[args.model])

  # Data.
  dataset = "digits_qa" if args.data == "default" else "digits_qa/large"
  common.set_data(config, dataset, modalities=modalities,
                  eval_splits=("val", "test", "test_compositional"),
                  audio_length=6000)
  config.text = ml_collections.ConfigDict()
  config.text.tokenizer = "bytes"
  config.text.max_length = 64 if generative else 48
  config.text.fields = ({"question": "prompt", "answer": "text"} if generative
                        else {"question": "text"})
  config.text.lengths = {"text": 16} if generative else {}  # answers
  vqa = ({"families": FAMILIES} if generative else
         {"families": FAMILIES, "answers": ANSWERS})
  config.evaluators = {"vqa": vqa}
  if len(modalities) > 1:  # accuracy with the audio, image (or question) gone
    config.evaluators["missing_modality"] = {"scored_by": "vqa", **vqa}

  # Model.
  config.model = ml_collections.ConfigDict()
  encoders = {"image": CELLS if args.image == "cells" else IMAGE,
              "audio": AUDIO, "text": QUESTION}
  config.model.encoders = {m: encoders[m] for m in modalities}
  if generative:
    config.objective = "captioning"
    config.model.conditioning = ("prefix" if args.model == "lm"
                                 else args.model)
    config.model.decoder = {
        "vocab_size": common.BYTE_VOCAB_SIZE, "width": 128, "num_layers": 3,
        "num_heads": 4, "mlp_dim": 512, "max_length": 160,
        "positions": "learned", "dropout": 0.0}
    config.model.bos_id = 1  # ByteTokenizer's end id starts each answer
    config.model.num_latents = 16
    config.model.xattn_every = 1
    if args.registers:  # (absent otherwise: earlier runs resume as they were)
      config.model.registers = args.registers
    common.set_generation(config, max_new_tokens=16)
  else:
    config.objective = "supervised"
    config.model.fusion = "bottleneck"  # token positions: the grid cells
    config.model.fusion_kwargs = {"dim": 128, "num_layers": 3,
                                  "fusion_layer": 0, "num_bottlenecks": 8}
    config.model.head_hidden = (128,)
    config.model.num_classes = len(ANSWERS)
    config.model.modality_dropout = {}
    config.model.missing = "zero"
  # Pretrained parts, locked: Flamingo's LM, the cells' MNIST LeNet.
  init, frozen = {}, []
  if args.lm:
    init["decoder"] = f"run:{args.lm}"
    frozen.append("decoder/.*")
  if args.cells and "image" in modalities:
    init[CELL_ENCODER] = f"run:{args.cells}#encoder_image"
    frozen.append(f"{CELL_ENCODER}/.*")
  if init:
    config.model.init = init
    config.frozen = "|".join(frozen)

  # Optimisation, parallelism, logging and checkpoints.
  common.set_training(config, batch_size=64, steps=args.steps,
                      smoke=args.smoke, log_every=100, eval_batch_size=200,
                      checkpoint_every=500)
  if args.smoke:  # a small evaluation
    config.eval_splits = ("val[:200]",)
  return config
