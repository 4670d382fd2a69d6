"""Token-level fusion train steps, mmjax against the same model in PyTorch.

  python benchmarks/fusion_step.py [--fusions perceiver,coattention] \
      [--setting avmnist|large] [--batch 128] [--iters 10]

mmjax's `MultimodalClassifier` with identity encoders (`Tokens`, so the
fusion reads precomputed tokens: random float32 [B, N_m, D_m] per modality,
every modality present), one fusion and the MLP head (100 hidden units, 10
classes) of `configs/avmnist.py`, takes one full supervised train step
(forward, backward, AdamW update; cross-entropy of random labels) on a fixed
batch. The fusions:

  perceiver    `PerceiverFusion`: per-modality projections, the Flamingo
               Perceiver resampler (each modality one frame, padded with
               masked tokens to the longest), mean over the latents.
  coattention  `CoAttentionFusion`: ViLBERT co-attention ("CT": one
               co-attention layer, then one self-attention layer per
               stream), mean pooling of each stream.

Settings (--setting):

  avmnist  the fusion widths of `configs/avmnist.py` (the fusions' defaults:
           width 64, 4 heads; perceiver 8 latents, 2 layers, MLP 256;
           coattention MLP 128) on tokens as wide as the `grid` LeNets'
           (image 48, audio 192 channels), with 49 image tokens (a 7x7 grid)
           and 100 audio tokens.
  large    a representative large fusion: width 512, 8 heads, MLP 2048,
           perceiver 64 latents (Flamingo's) and 2 layers, on ViT-S/16 patch
           tokens (196 x 384, a 224x224 image) and 100 audio tokens of
           width 768 (an AST-Base's).

The PyTorch twin (`benchmarks/torch_transformers.py`, eager, float32, as
many threads as the cores this process may use) starts from mmjax's initial
parameters and takes the same step. One JSON row per framework and fusion
(with the loss of the first step, which the two should share), then a row
with `speed_vs_torch` (PyTorch ms / mmjax ms: above 1, mmjax is faster).
The parameter counts of the two models must match (else `error:`).
"""


import flax.linen as nn
import jax
import numpy as np

import harness

NUM_CLASSES = 10

# setting -> ({modality: (tokens, width)}, {fusion: fusion_kwargs}).
SETTINGS = {
    "avmnist": ({"image": (49, 48), "audio": (100, 192)},
                {"perceiver": {"dim": 64, "num_latents": 8, "num_layers": 2,
                               "num_heads": 4},
                 "coattention": {"dim": 64, "num_heads": 4, "layers": "CT",
                                 "mlp_dim": 128}}),
    "large": ({"image": (196, 384), "audio": (100, 768)},
              {"perceiver": {"dim": 512, "num_latents": 64, "num_layers": 2,
                             "num_heads": 8, "mlp_dim": 2048},
               "coattention": {"dim": 512, "num_heads": 8, "layers": "CT",
                               "mlp_dim": 2048}}),
}


class Tokens(nn.Module):
  """The identity encoder: precomputed tokens [B, N, D] pass unchanged
  (named in configs by the import string "fusion_step:Tokens")."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    return x


def make_config(fusion: str, batch_size: int, fusion_kwargs: dict):
  """configs/avmnist.py with `fusion` on identity encoders."""
  config = harness.load_config(f"configs/avmnist.py:fusion={fusion}",
                               batch_size=batch_size)
  with config.unlocked():
    config.model.encoders = {m: {"name": "fusion_step:Tokens"}
                             for m in config.modalities}
    config.model.fusion_kwargs = dict(fusion_kwargs)
  return config


def make_batch(batch_size: int, tokens: dict, seed: int = 0) -> dict:
  """float32 tokens [B, N_m, D_m] per modality, masks all True, labels."""
  return harness.seeded_batch(
      {**{m: (np.float32, (batch_size, n, d), 0)
          for m, (n, d) in tokens.items()},
       **{f"mask/{m}": (np.bool_, (batch_size,), 0) for m in tokens},
       "label": (np.int32, (batch_size,), NUM_CLASSES)}, seed)


def torch_model(fusion: str, config, tokens: dict):
  """The PyTorch twin of `config`'s classifier on tokens of these widths."""
  import torch_transformers  # pylint: disable=import-outside-toplevel
  widths = {m: d for m, (_, d) in tokens.items()}
  kwargs = dict(config.model.fusion_kwargs)
  if fusion == "perceiver":
    module = torch_transformers.PerceiverFusion(widths, **kwargs)
    fused = kwargs.get("dim", 64)
  elif fusion == "coattention":
    module = torch_transformers.CoAttentionFusion(widths, **kwargs)
    fused = 2 * kwargs.get("dim", 64)
  else:
    raise SystemExit(f"error: no PyTorch twin of fusion {fusion!r} (known: "
                     "perceiver, coattention)")
  return torch_transformers.TokenClassifier(
      module, fused, tuple(config.model.head_hidden), NUM_CLASSES)


def main():
  parser = harness.parser(__doc__, batch=128)
  parser.add_argument("--fusions", default="perceiver,coattention")
  parser.add_argument("--setting", default="avmnist", choices=sorted(SETTINGS))
  args = parser.parse_args()
  torch = harness.import_torch()
  if torch:
    from torch.nn import functional as F  # pylint: disable=import-outside-toplevel
    import torch_transformers  # pylint: disable=import-outside-toplevel
  tokens, fusion_settings = SETTINGS[args.setting]
  batch = make_batch(args.batch, tokens)
  for fusion in args.fusions.split(","):
    name = f"fusion/{fusion}/{args.setting}"
    config = make_config(fusion, args.batch, fusion_settings[fusion])
    step = harness.MmjaxStep(config, batch)
    loss = step.first_loss()
    ms = harness.time_ms(step.run, iters=args.iters)
    harness.emit(harness.step_row(name, "mmjax", ms, args.batch, step.flops,
                                  num_params=step.num_params,
                                  loss=round(loss, 5)))
    if args.xla_defaults:
      harness.emit_xla_defaults_row(name, config, batch, args.iters)
    if not torch:
      continue
    model = torch_model(fusion, config, tokens)
    if (count := sum(p.numel() for p in model.parameters())) != step.num_params:
      raise SystemExit(f"error: PyTorch {name} has {count} parameters, mmjax "
                       f"{step.num_params}")
    torch_transformers.load_flax_params(model,
                                        jax.device_get(step.state.params))
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()
              if k != "label"}
    labels = torch.from_numpy(batch["label"]).long()
    reference = torch_transformers.TorchStep(
        model, inputs, lambda logits: F.cross_entropy(logits, labels))
    torch_loss = float(reference.run())  # the first step, from mmjax's init
    harness.emit_torch_comparison(name, ms, step.flops, reference, args.batch,
                                  args.iters, loss=round(torch_loss, 5))


if __name__ == "__main__":
  main()
