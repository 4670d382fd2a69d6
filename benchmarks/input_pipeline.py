"""Examples/s of the input pipeline alone, next to what the train step
consumes.

  python benchmarks/input_pipeline.py [--batches 30] \
      [--configs "configs/avmnist.py;configs/avmnist.py:clean;configs/coco_mini.py"]

For each config: the trainer's step on the first batch of the trainer's
own iterator (`Experiment.train_iterator`: grain reading array_record,
shuffling, decoding, batching, and placing the batch on the devices) is
timed; then the iterator is drained for `--batches` batches after two
warm-up ones, with nothing else running. `pipeline_vs_step` above 1 means the data arrive faster
than the step consumes them. Datasets are built under $TFDS_DATA_DIR first
if needed (a minute at most).
"""

import argparse
import contextlib
import sys
import time

import jax

import harness
from mmjax import experiment


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="configs/avmnist.py;"
                      "configs/avmnist.py:clean;configs/coco_mini.py")
  parser.add_argument("--batches", type=int, default=30)
  args = parser.parse_args()
  for spec in args.configs.split(";"):
    config = harness.load_config(spec)
    with contextlib.redirect_stdout(sys.stderr):  # tfds reports a first build
      run = experiment.build(config)
    data = run.train_iterator()
    step = harness.MmjaxStep(config, jax.device_get(next(data)), run=run)
    ms = harness.time_ms(step.run)
    for _ in range(2):
      jax.block_until_ready(next(data))
    start = time.perf_counter()
    for _ in range(args.batches):
      batch = next(data)
    jax.block_until_ready(batch)
    pipeline = args.batches * config.batch_size / (time.perf_counter() - start)
    row = harness.step_row(f"input_pipeline/{spec}", "mmjax", ms,
                           config.batch_size, step.flops)
    harness.emit({**row, "dataset": config.dataset,
                  "data_workers": config.data_workers,
                  "pipeline_examples_per_sec": round(pipeline, 1),
                  "step_examples_per_sec": row["examples_per_sec"],
                  "pipeline_vs_step": round(pipeline / row["examples_per_sec"],
                                            2)})


if __name__ == "__main__":
  main()
