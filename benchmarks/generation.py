"""Generative models: train steps per second and decoding tokens per second.

  python benchmarks/generation.py [--config configs/digits_qa.py:model=prefix]
      [--workdir DIR] [--iters 5]

For the config's model (objective captioning or coca): the train step
(`harness.MmjaxStep` on one real training batch: ms per step, steps/s,
examples/s, MFU), then decoding one eval batch of `eval_batch_size` with the
KV cache (`mmjax.models.generative.generate`, jitted as the evaluators run
it) by greedy search, beam search (4 beams) and sampling (top-k 20):
ms per batch and tokens/s, a token being a generated id up to and including
each example's end token (the loop stops once every example has ended, at
`max_new_tokens` at the latest). With --workdir the latest checkpoint of
that run is restored first (a trained model ends its answers; an untrained
one decodes every step).
"""

import contextlib
import sys

import jax
import numpy as np

import harness
from mmjax import checkpoint, experiment
from mmjax.models.generative import PAD_ID

DECODERS = {"greedy": {}, "beam": {"method": "beam", "beam_size": 4},
            "sample": {"method": "sample", "top_k": 20}}


def main():
  p = harness.parser(__doc__, batch=0)
  p.add_argument("--config", default="configs/digits_qa.py:model=prefix")
  p.add_argument("--workdir", default="")
  args = p.parse_args()
  config = harness.load_config(args.config)
  if args.batch:
    config = harness.load_config(args.config, batch_size=args.batch)
  with contextlib.redirect_stdout(sys.stderr):  # tfds reports a first build
    run = experiment.build(config)
    if args.workdir:
      ckpt = checkpoint.Checkpointer(args.workdir)
      run.state, _ = ckpt.restore(run.state)
      ckpt.close()
  batch = jax.device_get(next(run.train_iterator()))
  step = harness.MmjaxStep(config, batch, run)
  ms = harness.time_ms(step.run, iters=args.iters)
  name = f"generation/{args.config}"
  harness.emit(harness.step_row(name, "mmjax", ms, config.batch_size,
                                step.flops, steps_per_sec=round(1e3 / ms, 3),
                                num_params=step.num_params,
                                trained=bool(args.workdir)))
  eval_batch = next(iter(run.eval_batches(run.data_source(
      config.eval_splits[0]))))
  base = experiment.generation_options(config)
  for decoder, options in DECODERS.items():
    predict = experiment.make_predict_fn(run.model, {**base, **options})
    tokens = jax.device_get(predict(run.state, eval_batch)["tokens"])
    decode_ms = harness.time_ms(
        lambda: jax.block_until_ready(predict(run.state, eval_batch)),
        warmup=1, iters=args.iters)
    generated = int(np.sum(tokens != PAD_ID))
    harness.emit({"benchmark": name, "framework": "mmjax",
                  "decoder": decoder, "batch_size": tokens.shape[0],
                  "max_new_tokens": base["max_new_tokens"],
                  "ms_per_batch": round(decode_ms, 1),
                  "generated_tokens": generated,
                  "tokens_per_sec": round(generated / decode_ms * 1e3, 1),
                  "trained": bool(args.workdir)})


if __name__ == "__main__":
  main()
