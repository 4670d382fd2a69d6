"""Image captioning on coco_mini: an image encoder and a byte-level decoder.

Command:
  python -m mmjax.train --config configs/coco_mini_captioning.py \
      --workdir /tmp/coco_mini_captioning
  python -m mmjax.generate --config configs/coco_mini_captioning.py \
      --workdir /tmp/coco_mini_captioning --split train

Arguments (comma list after the colon):
  model=NAME         prefix (default; PaLI-style media prefix),
                     cross_attention or flamingo (mmjax.models.generative),
                     or coca: CoCa (Yu et al. 2022, mmjax.models.coca), the
                     image tower with a unimodal text decoder (2 layers)
                     and a multimodal one (1 layer), trained with the
                     contrastive plus captioning loss (weights 1 and 2).
  gpt2=DIR           the decoder is the Hugging Face GPT-2 checkpoint in DIR
                     (config.json, model.safetensors, tokenizer.json),
                     with its BPE tokenizer (`text.tokenizer = "gpt2:DIR"`,
                     ids moved up by one for padding id 0); with
                     model=flamingo it is frozen (Alayrac et al. 2022:
                     only the resampler and the gated cross-attention
                     train), with model=prefix fine-tuned (PaLI). Not with
                     cross_attention (GPT-2 has no cross-attention blocks)
                     or coca.
  llama=DIR          the same with a Hugging Face Llama-family checkpoint
                     (`text.tokenizer = "llama:DIR"`, each caption between
                     its start and end tokens; the KV cache cut to 160
                     positions, which rotary positions allow).
  smoke              a complete run in under 2 minutes on 2 CPU cores.
  seed=N             the run's seed.
  steps=N            training steps (default 1500).

Data: `coco_mini`, the 86 redistributable COCO photos at 64x64 with their 5
human captions (train 66, test 20). Each training visit of an image draws
one caption; captions are UTF-8 bytes (ByteTokenizer, at most 63 bytes and
the end token). Model: a small ResNet-18 (width 16, CIFAR stem; 8x8 = 64
image tokens) and a 3-layer, width-128 decoder with learned positions and
tied embeddings. Evaluation: greedy captions of the test images scored
against their 5 references (BLEU-4, CIDEr-D, ROUGE-L; `captioning`).

This is a tiny-data result: 66 training images teach the model to reproduce
its training captions (the overfitting check of the README's "Generation"
section), not to describe new photos; the test scores show the machinery end
to end. Expected result and runtime: README "Generation".
"""

import ml_collections

from mmjax.configs import common
from mmjax.errors import UsageError
from mmjax.models import gpt2_config, llama_config


def _pretrained_decoder(kind: str, directory: str) -> tuple[dict, int]:
  """(TextDecoder kwargs, start id) of a GPT-2 or Llama checkpoint, ids
  moved up by one for padding id 0."""
  offset = gpt2_config.PADDING_OFFSET
  if kind == "gpt2":
    return (gpt2_config.read_gpt2_config(directory, offset),
            gpt2_config.token_id(directory, "<|endoftext|>", offset))
  decoder = llama_config.read_llama_config(directory, offset)
  decoder["max_length"] = min(decoder["max_length"], 160)
  start, _ = llama_config.special_tokens(directory)
  return decoder, gpt2_config.token_id(directory, start, offset)


def get_config(arg=None):
  args = common.parse_arg(arg, model="prefix", gpt2="", llama="", smoke=False,
                          seed=0, steps=1500)
  pretrained = [(k, d) for k, d in (("gpt2", args.gpt2),
                                    ("llama", args.llama)) if d]
  if len(pretrained) > 1:
    raise UsageError("config arguments gpt2 and llama exclude each other")
  if pretrained and args.model not in ("prefix", "flamingo"):
    raise UsageError(f"config argument {pretrained[0][0]} needs model=prefix "
                     f"or flamingo, not {args.model}")
  config = ml_collections.ConfigDict()
  config.seed = args.seed

  # Data.
  common.set_data(config, "coco_mini", modalities=("image",),
                  eval_splits=("test",))
  config.text = ml_collections.ConfigDict()
  config.text.tokenizer = "bytes"
  config.text.max_length = 64
  config.text.captions_key = "captions"
  config.text.num_captions = 5
  config.evaluators = {"captioning": {}}

  # Model.
  config.model = ml_collections.ConfigDict()
  config.model.encoders = {
      "image": {"name": "resnet", "depth": 18, "width": 16, "stem": "cifar"}}
  config.model.bos_id = 1  # ByteTokenizer's end id starts each sequence
  if args.model == "coca":
    config.objective = "coca"
    config.objective_kwargs = {"caption_weight": 2.0,
                               "contrastive_weight": 1.0}
    config.model.update(vocab_size=common.BYTE_VOCAB_SIZE, width=128,
                        unimodal_layers=2, multimodal_layers=1, num_heads=4,
                        mlp_dim=512, max_length=160, embed_dim=64,
                        num_queries=64)
  else:
    config.objective = "captioning"
    config.model.conditioning = args.model
    config.model.decoder = {
        "vocab_size": common.BYTE_VOCAB_SIZE, "width": 128, "num_layers": 3,
        "num_heads": 4, "mlp_dim": 512, "max_length": 160,
        "positions": "learned", "dropout": 0.0}
    config.model.num_latents = 16  # flamingo's resampler
    config.model.xattn_every = 1
  for kind, directory in pretrained:  # a pretrained LM as the decoder
    try:
      decoder, config.model.bos_id = _pretrained_decoder(kind, directory)
    except (OSError, ValueError) as e:
      raise UsageError(f"config argument {kind}: {e}") from e
    config.model.decoder = {**decoder, "dropout": 0.0}
    config.text.tokenizer = f"{kind}:{directory}"
    config.model.init = {"decoder": f"{kind}:{directory}"}
    if args.model == "flamingo":
      config.frozen = "decoder/.*"
  common.set_generation(config, max_new_tokens=64)

  # Optimisation, parallelism, logging and checkpoints.
  common.set_training(config, batch_size=32, steps=args.steps,
                      smoke=args.smoke, log_every=50, eval_batch_size=20,
                      checkpoint_every=500)
  config.optimizer.learning_rate = 1e-3
  return config
