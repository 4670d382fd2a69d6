"""Examples/s of the webdataset tar reader on coco_mini repacked into shards.

  python benchmarks/webdataset_reader.py [--shards 8] [--image_format png]
      [--passes 20] [--batches 100]

coco_mini's train split (66 photos, 64x64, 5 captions; built under
$TFDS_DATA_DIR if needed) is repacked into `--shards` img2dataset-style tars
in a temporary directory (`mmjax.data.webdataset.repack`). Rows, one JSON line
each:
  webdataset/index   opening the source: header scan, us per tar member;
  webdataset/source  records decoded per second by `source[i]` (one thread,
                     a random order, `--passes` passes over the split);
  webdataset/train_iterator and tfds/train_iterator
                     examples/s of `pipeline.TrainIterator` at coco_mini's
                     batch size (32; grain's 4 read threads, shuffling,
                     one caption per visit tokenised with the byte
                     tokenizer, batching, device placement) over the shards
                     and over coco_mini's own array_record files, after two
                     warm-up batches.
"""

import argparse
import contextlib
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

import harness
from mmjax import parallel
from mmjax.data import builders, pipeline
from mmjax.data import webdataset as wds


def iterator_examples_per_sec(source, config, batches: int) -> float:
  """Examples/s of a TrainIterator over `source` after 2 warm-up batches."""
  it = pipeline.TrainIterator(source, config,
                              parallel.batch_sharding(parallel.make_mesh(1)))
  for _ in range(2):
    jax.block_until_ready(next(it))
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  jax.block_until_ready(batch)
  return batches * config.batch_size / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shards", type=int, default=8)
  parser.add_argument("--image_format", choices=("png", "jpg"), default="png")
  parser.add_argument("--passes", type=int, default=20)
  parser.add_argument("--batches", type=int, default=100)
  args = parser.parse_args()
  config = harness.load_config("configs/coco_mini.py")
  config.text.tokenizer = "bytes"  # MiniLM's tokenizer is an optional extra
  with contextlib.redirect_stdout(sys.stderr):  # tfds reports a first build
    coco = builders.get_builder("coco_mini", pipeline.default_data_dir())
  coco_train = coco.as_data_source(split="train")
  common = {"image_format": args.image_format, "shards": args.shards,
            "examples": len(coco_train)}

  with tempfile.TemporaryDirectory() as tmp:
    shards = wds.repack(coco_train, pathlib.Path(tmp) / "train", args.shards,
                        args.image_format)
    start = time.perf_counter()
    source = wds.WebDatasetSource([str(p) for p in shards])
    seconds = time.perf_counter() - start
    members = 3 * len(source)  # image, .txt, .json
    harness.emit({"benchmark": "webdataset/index", **common,
                  "us_per_member": round(seconds / members * 1e6, 1),
                  "bytes": sum(p.stat().st_size for p in shards)})

    order = np.random.default_rng(0).permutation(len(source))
    source[0]  # pylint: disable=pointless-statement  (opens the files)
    start = time.perf_counter()
    for _ in range(args.passes):
      for i in order:
        source[int(i)]  # pylint: disable=pointless-statement
    rate = args.passes * len(source) / (time.perf_counter() - start)
    harness.emit({"benchmark": "webdataset/source", **common,
                  "examples_per_sec": round(rate, 1)})

    for name, src in (("webdataset", source), ("tfds", coco_train)):
      rate = iterator_examples_per_sec(src, config, args.batches)
      harness.emit({"benchmark": f"{name}/train_iterator", **common,
                    "batch_size": config.batch_size,
                    "examples_per_sec": round(rate, 1)})


if __name__ == "__main__":
  main()
