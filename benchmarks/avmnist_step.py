"""AV-MNIST train steps, mmjax against the same model in PyTorch eager.

  python benchmarks/avmnist_step.py [--fusions concat,audio_only,image_only] \
      [--batch 128] [--iters 10]

The LeNet models of `configs/avmnist.py` (MultiBench's recipe: image and
spectrogram LeNets, an MLP head; `benchmarks/torch_lenet.py` for PyTorch)
take one full train step (forward, backward, AdamW update) on a fixed random
batch, in float32, one after the other in this process, with PyTorch on as
many threads as the cores this process may use. One JSON row per framework
and model, then a row with `speed_vs_torch` (PyTorch ms / mmjax ms: above 1,
mmjax is faster). The parameter counts of the two models must match.
"""

import numpy as np

import harness

SHAPES = {"image": (np.uint8, (28, 28, 1), 256),
          "audio": (np.uint8, (112, 112, 1), 256),
          "mask/image": (np.bool_, (), 0), "mask/audio": (np.bool_, (), 0),
          "label": (np.int32, (), 10)}
MODALITIES = {"concat": ("image", "audio"), "audio_only": ("audio",),
              "image_only": ("image",)}


def main():
  parser = harness.parser(__doc__, batch=128)
  parser.add_argument("--fusions", default="concat,audio_only,image_only")
  args = parser.parse_args()
  torch = harness.import_torch()
  if torch:
    import torch_lenet  # pylint: disable=import-outside-toplevel
  for fusion in args.fusions.split(","):
    batch = harness.seeded_batch({k: (d, (args.batch, *s), h)
                                  for k, (d, s, h) in SHAPES.items()})
    config = harness.load_config(f"configs/avmnist.py:fusion={fusion}",
                                 batch_size=args.batch)
    step = harness.MmjaxStep(config, batch)
    ms = harness.time_ms(step.run, iters=args.iters)
    harness.emit(harness.step_row(f"avmnist/{fusion}", "mmjax", ms,
                                  args.batch, step.flops,
                                  num_params=step.num_params))
    if args.xla_defaults:
      harness.emit_xla_defaults_row(f"avmnist/{fusion}", config, batch,
                                    args.iters)
    if not torch:
      continue
    model = torch_lenet.AvMnistClassifier(MODALITIES[fusion])
    inputs = {m: torch.from_numpy(batch[m][..., 0]) for m in MODALITIES[fusion]}
    reference = torch_lenet.TorchStep(model, inputs,
                                      torch.from_numpy(batch["label"]).long())
    if reference.num_params != step.num_params:
      raise SystemExit(f"error: PyTorch {fusion} has {reference.num_params} "
                       f"parameters, mmjax {step.num_params}")
    harness.emit_torch_comparison(f"avmnist/{fusion}", ms, step.flops,
                                  reference, args.batch, args.iters)

if __name__ == "__main__":
  main()
