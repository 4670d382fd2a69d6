"""Examples/s of the webdataset tar reader on coco_mini repacked into shards.

  python benchmarks/webdataset_reader.py [--shards 8] [--image_format png]
      [--passes 20] [--batches 100] [--many 2000]

coco_mini's train split (66 photos, 64x64, 5 captions; built under
$TFDS_DATA_DIR if needed) is repacked into `--shards` img2dataset-style tars
in a temporary directory (`mmjax.data.webdataset.repack`), with the shard
index cache there too ($MMJAX_CACHE_DIR). Rows, one JSON line each:
  webdataset/index   opening the source: header scan, us per tar member,
                     and the same list of shards opened again from the
                     index cache (ms);
  webdataset/index_many
                     `--many` shards (hard links to the repacked ones, so
                     each is a shard to index) opened cold and from the
                     cache, in seconds;
  webdataset/source  records decoded per second by `source[i]` (one thread,
                     a random order, `--passes` passes over the split);
  webdataset/train_iterator and tfds/train_iterator
                     examples/s of `pipeline.TrainIterator` at coco_mini's
                     batch size (32; grain's 4 read threads, shuffling,
                     one caption per visit tokenised with the byte
                     tokenizer, batching, device placement) over the shards
                     and over coco_mini's own array_record files, after two
                     warm-up batches; webdataset_many/train_iterator over
                     the `--many` shards. The shards are read as groups
                     (`pipeline.shard_group_count`: 8 groups of one shard
                     here, 32 of the many); grain's shuffle costs about
                     1.5 ms an index in a group as small as 8 examples,
                     230 us in 66 and 4 us in 10,000, so the 8-shard row
                     measures the shuffle of tiny groups, the many-shard
                     row the reader.
"""

import argparse
import contextlib
import os
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


def open_seconds(paths) -> tuple[float, wds.WebDatasetSource]:
  """Seconds to open a WebDatasetSource of `paths` (the index included)."""
  start = time.perf_counter()
  source = wds.WebDatasetSource([str(p) for p in paths])
  return time.perf_counter() - start, source


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shards", type=int, default=8)
  parser.add_argument("--image_format", choices=("png", "jpg"), default="png")
  parser.add_argument("--passes", type=int, default=20)
  parser.add_argument("--batches", type=int, default=100)
  parser.add_argument("--many", type=int, default=2000,
                      help="shards for the index_many row (0: no row)")
  args = parser.parse_args()
  config = harness.load_config("configs/coco_mini.py")
  config.text.tokenizer = "bytes"  # MiniLM's tokenizer is an optional extra
  with contextlib.redirect_stdout(sys.stderr):  # tfds reports a first build
    coco = builders.get_builder("coco_mini", pipeline.default_data_dir())
  coco_train = coco.as_data_source(split="train")
  common = {"image_format": args.image_format, "shards": args.shards,
            "examples": len(coco_train)}

  with tempfile.TemporaryDirectory() as tmp:
    os.environ["MMJAX_CACHE_DIR"] = str(pathlib.Path(tmp) / "cache")
    shards = wds.repack(coco_train, pathlib.Path(tmp) / "train", args.shards,
                        args.image_format)
    seconds, source = open_seconds(shards)
    cached, _ = open_seconds(shards)
    members = 3 * len(source)  # image, .txt, .json
    harness.emit({"benchmark": "webdataset/index", **common,
                  "us_per_member": round(seconds / members * 1e6, 1),
                  "cached_ms": round(cached * 1e3, 2),
                  "bytes": sum(p.stat().st_size for p in shards)})
    if args.many:
      many = pathlib.Path(tmp) / "many"
      many.mkdir()
      links = [many / f"{i:05d}.tar" for i in range(args.many)]
      for i, link in enumerate(links):
        os.link(shards[i % len(shards)], link)
      cold, big = open_seconds(links)
      warm, _ = open_seconds(links)
      harness.emit({"benchmark": "webdataset/index_many",
                    "shards": args.many, "examples": len(big),
                    "cold_s": round(cold, 3), "cached_s": round(warm, 3)})

    order = np.random.default_rng(0).permutation(len(source))
    source[0]  # pylint: disable=pointless-statement  (opens the files)
    start = time.perf_counter()
    for _ in range(args.passes):
      for i in order:
        source[int(i)]  # pylint: disable=pointless-statement
    rate = args.passes * len(source) / (time.perf_counter() - start)
    harness.emit({"benchmark": "webdataset/source", **common,
                  "examples_per_sec": round(rate, 1)})

    rows = [("webdataset", source, common), ("tfds", coco_train, common)]
    if args.many:
      rows.insert(1, ("webdataset_many", big, {"shards": args.many,
                                               "examples": len(big)}))
    for name, src, about in rows:
      rate = iterator_examples_per_sec(src, config, args.batches)
      groups = (pipeline.shard_group_count(config, len(src.shards), 1)
                if name.startswith("webdataset") else None)
      harness.emit({"benchmark": f"{name}/train_iterator", **about,
                    "batch_size": config.batch_size, "shard_groups": groups,
                    "examples_per_sec": round(rate, 1)})


if __name__ == "__main__":
  main()
