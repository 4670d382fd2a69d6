"""Image-text contrastive train steps, mmjax against the same model in PyTorch.

  python benchmarks/contrastive_step.py [--objectives softmax,sigmoid] \
      [--batch 16] [--iters 10] [--image-size 224] [--seq-len 32]

mmjax's `ContrastiveModel` with a ViT-S/16 image tower (width 384, depth 12,
6 heads, MLP 1536, patch 16, learned position embedding, mean over the patch
tokens) and a BERT-small text tower (Turc et al. 2019: width 512, depth 4,
8 heads, MLP 2048, the 30,522 WordPiece vocabulary, 512 positions, mean over
the real tokens), each with its linear projection to a shared 384-d space,
takes one full train step (forward, backward, AdamW update, built from
`configs/av_contrastive.py` with the encoders replaced) on a fixed random
batch: uint8 images [B, S, S, 3] and captions of random length (1 to
--seq-len tokens, padded with id 0). Objective `softmax` is CLIP's loss with
a learned logit scale (clamped to [0, log 100] after the update), `sigmoid`
SigLIP's with a learned scale and bias. The PyTorch twin
(`benchmarks/torch_transformers.py`, eager, float32, as many threads as the
cores this process may use) starts from mmjax's initial parameters and takes
the same step. One JSON row per framework and objective (with the loss of
the first step, which the two should share), then a row with
`speed_vs_torch` (PyTorch ms / mmjax ms: above 1, mmjax is faster). The
parameter counts of the two models must match (else `error:`).
"""


import jax
import numpy as np

import harness

# ViT-S/16 (big_vision's "S": Zhai et al. 2022) and BERT-small (Turc et al.,
# "Well-Read Students Learn Better", 2019) in mmjax's encoder-spec format.
VIT_S16 = {"name": "vit", "width": 384, "depth": 12, "mlp_dim": 1536,
           "num_heads": 6, "patch_size": 16, "pool": "gap"}
BERT_SMALL = {"name": "bert", "vocab_size": 30522, "hidden_size": 512,
              "num_layers": 4, "num_heads": 8, "intermediate_size": 2048,
              "max_position_embeddings": 512, "pool": "mean"}


def make_config(objective: str, batch_size: int, encoders: dict,
                embed_dim: int):
  """configs/av_contrastive.py with image and text towers `encoders`."""
  config = harness.load_config(
      f"configs/av_contrastive.py:objective={objective},batch={batch_size}")
  with config.unlocked():
    config.modalities = ("image", "text")
    config.model.encoders = encoders
    config.model.embed_dim = embed_dim
  return config


def make_batch(batch_size: int, image_size: int, seq_len: int,
               vocab_size: int, seed: int = 0) -> dict:
  """uint8 images [B, S, S, 3]; int32 ids [B, L], each row 1..L real tokens
  (ids 1..vocab-1) then padding (id 0)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch_size, image_size, image_size, 3),
                        dtype=np.uint8)
  ids = rng.integers(1, vocab_size, (batch_size, seq_len)).astype(np.int32)
  lengths = rng.integers(1, seq_len + 1, (batch_size, 1))
  ids[np.arange(seq_len)[None] >= lengths] = 0
  return {"image": images, "text": ids}


def main():
  parser = harness.parser(__doc__, batch=16)
  parser.add_argument("--objectives", default="softmax,sigmoid")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--seq-len", type=int, default=32)
  parser.add_argument("--embed-dim", type=int, default=384)
  args = parser.parse_args()
  torch = harness.import_torch()
  if torch:
    import torch_transformers  # pylint: disable=import-outside-toplevel
  encoders = {"image": VIT_S16, "text": BERT_SMALL}
  batch = make_batch(args.batch, args.image_size, args.seq_len,
                     BERT_SMALL["vocab_size"])
  shape = {"image_size": args.image_size, "seq_len": args.seq_len,
           "embed_dim": args.embed_dim}
  for objective in args.objectives.split(","):
    name = f"contrastive/{objective}"
    config = make_config(objective, args.batch, encoders, args.embed_dim)
    step = harness.MmjaxStep(config, batch)
    loss = step.first_loss()
    ms = harness.time_ms(step.run, iters=args.iters)
    harness.emit(harness.step_row(name, "mmjax", ms, args.batch, step.flops,
                                  num_params=step.num_params,
                                  loss=round(loss, 5), **shape))
    if args.xla_defaults:
      harness.emit_xla_defaults_row(name, config, batch, args.iters, **shape)
    if not torch:
      continue
    model = torch_transformers.contrastive_model(
        encoders, args.image_size, args.embed_dim, objective)
    if (count := sum(p.numel() for p in model.parameters())) != step.num_params:
      raise SystemExit(f"error: PyTorch {name} has {count} parameters, mmjax "
                       f"{step.num_params}")
    torch_transformers.load_flax_params(model,
                                        jax.device_get(step.state.params))
    inputs = {"image": torch.from_numpy(batch["image"]),
              "text": torch.from_numpy(batch["text"]).long()}
    reference = torch_transformers.TorchStep(
        model, inputs, torch_transformers.CONTRASTIVE_LOSSES[objective],
        clamp_log_scale=objective == "softmax")
    torch_loss = float(reference.run())  # the first step, from mmjax's init
    harness.emit_torch_comparison(name, ms, step.flops, reference, args.batch,
                                  args.iters, loss=round(torch_loss, 5),
                                  **shape)


if __name__ == "__main__":
  main()
