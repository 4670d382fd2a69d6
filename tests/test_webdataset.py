"""webdataset tar shards: repacked coco_mini read back, groups of shards,
epochs without duplicates or gaps, exact resume, bad input, the CLI."""

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time

import ml_collections
import numpy as np
import pytest

from mmjax import parallel
from mmjax.data import builders, pipeline
from mmjax.data import webdataset as wds
from mmjax.errors import UsageError

NUM_SHARDS = 8
TRAIN, TEST = 66, 20


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A tfds data_dir with coco_mini built."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builders.get_builder("coco_mini", data_dir)
  return data_dir


@pytest.fixture(scope="module")
def coco(data_dir):
  """coco_mini's train and test records, in order."""
  builder = builders.get_builder("coco_mini", data_dir)
  return {s: [builder.as_data_source(split=s)[i]
              for i in range(TRAIN if s == "train" else TEST)]
          for s in ("train", "test")}


@pytest.fixture(scope="module")
def root(tmp_path_factory, coco):
  """coco_mini repacked into root/<split>/00000.tar ... 00007.tar."""
  root = tmp_path_factory.mktemp("wds")
  for split, records in coco.items():
    wds.repack(records, root / split, NUM_SHARDS)
  return root


@pytest.fixture(scope="module")
def pattern(root):
  return f"wds:{root}/{{split}}/{{00000..{NUM_SHARDS - 1:05d}}}.tar"


@pytest.fixture(scope="module")
def identity(coco):
  """image bytes -> position in coco_mini train (the images are distinct)."""
  ids = {r["image"].tobytes(): i for i, r in enumerate(coco["train"])}
  assert len(ids) == TRAIN
  return ids


def config(pattern, workers=0, batch_size=6):
  return ml_collections.ConfigDict(dict(
      dataset=pattern, data_dir="", source_dir="", batch_size=batch_size,
      seed=3, modalities=("image", "text"), audio_length=0,
      data_workers=workers, text=dict(tokenizer="bytes", max_length=16,
                                      captions_key="captions")))


def train_iterator(pattern, process_index=0, process_count=1, **kwargs):
  cfg = config(pattern, **kwargs)
  return pipeline.TrainIterator(
      pipeline.data_source(cfg, "train"), cfg,
      parallel.batch_sharding(parallel.make_mesh(1)), process_index,
      process_count)


def positions(batch, identity) -> list[int]:
  """The coco_mini train positions of a batch's examples."""
  return [identity[x.tobytes()] for x in np.asarray(batch["image"])]


def shard_of(position: int) -> int:
  """The shard `repack` wrote coco_mini train example `position` to (sizes
  9, 9, 8, 8, 8, 8, 8, 8)."""
  return next(s for s, part in enumerate(
      np.array_split(np.arange(TRAIN), NUM_SHARDS)) if position in part)


# ------------------------------------------------------------------ records


@pytest.mark.parametrize("split", ["train", "test"])
def test_records_equal_coco_minis(pattern, coco, split):
  source = pipeline.data_source(config(pattern), split)
  assert len(source) == len(coco[split])
  keys = []
  for i, expected in enumerate(coco[split]):
    record = source[i]
    assert record["image"].dtype == np.uint8
    np.testing.assert_array_equal(record["image"], expected["image"])
    assert record["captions"].dtype == object
    assert list(record["captions"]) == list(expected["captions"])
    keys.append(record["key"])
  assert keys == sorted(set(keys)) and keys[0] == "000000000"
  last = len(np.array_split(np.arange(len(keys)), NUM_SHARDS)[-1]) - 1
  assert keys[-1] == f"{NUM_SHARDS - 1:05d}{last:04d}"


def test_shards_have_img2datasets_layout(root, coco):
  with tarfile.open(root / "train" / "00001.tar") as tar:
    names = tar.getnames()
    meta = json.load(tar.extractfile("000010000.json"))
    text = tar.extractfile("000010000.txt").read().decode()
  assert names[:3] == ["000010000.png", "000010000.txt", "000010000.json"]
  assert len(names) == 3 * 9
  expected = coco["train"][9]  # shard 1 starts after shard 0's 9 examples
  assert meta["image_id"] == expected["image_id"]
  assert meta["captions"] == [c.decode() for c in expected["captions"]]
  assert text == meta["caption"] == meta["captions"][0]
  assert (meta["key"], meta["width"], meta["height"]) == ("000010000", 64, 64)


def test_patterns_globs_and_splits(root, pattern):
  glob = pipeline.data_source(config(f"wds:{root}/{{split}}/*.tar"), "test")
  assert len(glob) == TEST and len(glob.shards) == NUM_SHARDS
  one = pipeline.data_source(config(f"wds:{root}/train/0000{{0,3}}.tar"),
                             "train")
  assert len(one) == 9 + 8
  with pytest.raises(UsageError, match=r"no \{split\}.*'test'"):
    pipeline.data_source(config(f"wds:{root}/train/*.tar"), "test")
  with pytest.raises(UsageError, match="cannot be sliced"):
    pipeline.data_source(config(pattern), "train[:10]")


def test_expand_braces():
  assert wds.expand_braces("s/{00008..00010}.tar") == [
      "s/00008.tar", "s/00009.tar", "s/00010.tar"]
  assert wds.expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]
  assert wds.expand_braces("{3..1}") == ["3", "2", "1"]
  assert wds.expand_braces("{x,{y,z}w}") == ["x", "yw", "zw"]
  assert wds.expand_braces("{split}/{8..9}") == ["{split}/8", "{split}/9"]
  with pytest.raises(UsageError, match="unbalanced"):
    wds.expand_braces("a{1..2")


# --------------------------------------------------- epochs and processes


def global_batches(pattern, process_count, steps, state=None, **kwargs):
  """`steps` global batches of `process_count` processes: their local
  batches concatenated in process order (after `state`, if given)."""
  its = [train_iterator(pattern, i, process_count, **kwargs)
         for i in range(process_count)]
  if state is not None:
    for it in its:
      it.set_state(state)
  batches = []
  for _ in range(steps):
    local = [next(it) for it in its]
    batches.append({k: np.concatenate([np.asarray(b[k]) for b in local])
                    for k in local[0]})
  return batches, its[0].get_state()


def test_each_group_is_one_shard_shuffled_anew_every_epoch(pattern,
                                                           identity):
  # batch 8 over 8 shards: 8 groups of one shard, one example each a batch.
  batches, _ = global_batches(pattern, 1, 16, batch_size=8)
  rows = np.array([positions(b, identity) for b in batches])  # [16, 8]
  for g in range(NUM_SHARDS):
    assert {shard_of(p) for p in rows[:, g]} == {g}
  first = rows[:8].reshape(-1)
  assert len(set(first)) == 64  # no duplicates in a pass over the groups
  for g in range(2, NUM_SHARDS):  # the 8-example shards: whole epochs
    assert sorted(rows[:8, g]) == sorted(rows[8:, g])
    assert list(rows[:8, g]) != list(rows[8:, g])


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_see_the_global_batches_of_one_process(
    pattern, identity, process_count):
  one, _ = global_batches(pattern, 1, 20, batch_size=8)
  many, _ = global_batches(pattern, process_count, 20, batch_size=8)
  for a, b in zip(one, many):
    assert set(a) == set(b) >= {"image", "text", "mask/text"}
    for key in a:  # images and the captions drawn: bit-identical
      np.testing.assert_array_equal(a[key], b[key])
  # Process i reads only its groups' shards: rows [2i, 2i + 2) for 4.
  local = 8 // process_count
  for i in range(process_count):
    shards = {shard_of(p) for b in many
              for p in positions(b, identity)[i * local:(i + 1) * local]}
    assert shards == set(range(i * local, (i + 1) * local))


@pytest.mark.parametrize("workers", [0, 1])
def test_position_resumes_bit_identically_with_another_process_count(
    pattern, workers):
  expected, _ = global_batches(pattern, 2, 16, workers=workers)
  _, state = global_batches(pattern, 2, 13, workers=workers)
  state = json.loads(json.dumps(state))  # as the checkpoint keeps it
  for count in (2, 1):
    resumed, _ = global_batches(pattern, count, 3, state, workers=workers)
    for want, got in zip(expected[13:], resumed):
      assert set(got) == set(want)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_shard_group_counts(pattern):
  cfg = config(pattern, batch_size=12)
  assert pipeline.shard_group_count(cfg, 8, 1) == 6  # divisors of 12: <= 8
  assert pipeline.shard_group_count(cfg, 100, 4) == 12
  cfg.shard_groups = 5
  with pytest.raises(UsageError, match="'shard_groups': 5 .* divide "
                     "batch_size 12"):
    pipeline.shard_group_count(cfg, 8, 1)
  cfg.shard_groups = 3
  with pytest.raises(UsageError, match="cannot be split over 2 processes"):
    pipeline.shard_group_count(cfg, 8, 2)
  cfg.shard_groups = 0
  with pytest.raises(UsageError, match="default shard_groups .* 3 processes"):
    pipeline.shard_group_count(config(pattern, batch_size=9), 1, 3)


def test_more_groups_than_shards_stride_examples(pattern):
  source = pipeline.data_source(config(pattern), "train")
  groups = [[r["key"] for r in group] for group in source.shard_groups(12)]
  assert [len(g) for g in groups] == [6] * 6 + [5] * 6
  assert sorted(sum(groups, [])) == [source[i]["key"] for i in range(TRAIN)]
  assert groups[1][:2] == [source[1]["key"], source[13]["key"]]


def test_index_is_cached_per_list_of_shards(root, tmp_path, monkeypatch):
  monkeypatch.setenv("MMJAX_CACHE_DIR", str(tmp_path))
  paths = wds.shard_paths(f"{root}/train/*.tar", "train")
  scanned = []
  monkeypatch.setattr(wds, "scan_shard", lambda p, scan=wds.scan_shard: (
      scanned.append(p) or scan(p)))
  first = wds.WebDatasetSource(paths)
  assert len(scanned) == NUM_SHARDS
  assert len(list((tmp_path / "wds_index").glob("*.npz"))) == 1
  again = wds.WebDatasetSource(paths)  # from the cache: nothing scanned
  assert len(scanned) == NUM_SHARDS
  for a, b in zip(first.shards, again.shards):
    np.testing.assert_array_equal(a.spans, b.spans)
  assert again[17]["key"] == first[17]["key"]
  wds.WebDatasetSource(paths[:3])  # another list: scanned and cached
  assert len(scanned) == NUM_SHARDS + 3
  # A changed shard (a new modification time) is scanned again.
  copy = tmp_path / "copy"
  copy.mkdir()
  (copy / "0.tar").write_bytes(pathlib.Path(paths[0]).read_bytes())
  wds.WebDatasetSource([str(copy / "0.tar")])
  os.utime(copy / "0.tar", ns=(1, 1))
  wds.WebDatasetSource([str(copy / "0.tar")])
  assert len(scanned) == NUM_SHARDS + 5
  # An unwritable cache is skipped, not an error.
  monkeypatch.setenv("MMJAX_CACHE_DIR", str(copy / "0.tar"))
  assert len(wds.WebDatasetSource(paths[:2])) == 18


# --------------------------------------------------------------- bad input


def write_tar(path, members, *, gzip=False):
  """members: [(name, bytes)] -> a tar at `path`."""
  with tarfile.open(path, "w:gz" if gzip else "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def png(value=0):
  return wds.example_members({"image": np.full((4, 4, 3), value, np.uint8),
                              "captions": ["a"]}, "k", "png")[0][1]


def open_shard(path):
  return pipeline.data_source(config(f"wds:{path}"), "train")


def test_no_shard_matches(tmp_path):
  with pytest.raises(UsageError, match="config key 'dataset'.*no shard"):
    open_shard(tmp_path / "*.tar")
  write_tar(tmp_path / "00000.tar", [("0001.png", png()), ("0001.txt", b"a")])
  with pytest.raises(UsageError, match=r"shard not found: .*00001\.tar"):
    open_shard(tmp_path / "{00000..00001}.tar")


@pytest.mark.parametrize("case, match", [
    ("garbage", "unreadable tar shard .*bad.tar"),
    ("gzip", "unreadable tar shard .*uncompressed"),
    ("truncated", "bad.tar is truncated"),
    ("corrupt_header", "corrupt member header"),
    ("no_image", "example 0001 has no image member"),
    ("no_caption", "example 0001 has no caption member"),
    ("not_adjacent", "example 0001 are not adjacent"),
])
def test_bad_shards(tmp_path, case, match):
  path = tmp_path / "bad.tar"
  good = [("0001.png", png()), ("0001.txt", b"a cat"),
          ("0002.png", png(9)), ("0002.txt", b"a dog")]
  if case == "garbage":
    path.write_bytes(b"not a tar file " * 100)
  elif case == "gzip":
    write_tar(path, good, gzip=True)
  elif case in ("truncated", "corrupt_header"):
    data = write_tar(path, good).read_bytes()
    with tarfile.open(path) as tar:  # the headers of 0001.txt and 0002.png
      txt, second = (m.offset for m in tar.getmembers()[1:3])
    path.write_bytes(data[:txt + 600] if case == "truncated" else
                     data[:second] + b"\xff" * 512 + data[second + 512:])
  elif case == "no_image":
    write_tar(path, [("0001.txt", b"a cat")] + good[2:])
  elif case == "no_caption":
    write_tar(path, [("0001.png", png())] + good[2:])
  else:
    write_tar(path, good + [("0001.json", b"{}")])
  with pytest.raises(UsageError, match=match) as e:
    open_shard(path)
  assert "\n" not in str(e.value)


def test_captions_from_txt_or_json_and_bad_images(tmp_path):
  path = write_tar(tmp_path / "s.tar", [
      ("a/0001.PNG", png()), ("a/0001.txt", b" from txt \n"),
      ("a/0002.png", png()), ("a/0002.json", b'{"caption": "from json"}'),
      ("a/0003.png", png()), ("a/0003.txt", b"t"),
      ("a/0003.json", b'{"captions": ["x", "y"]}'),
      ("a/0004.jpg", b"not a jpeg"), ("a/0004.txt", b"t"),
      ("a/0005.png", png()), ("a/0005.json", b'{"url": "u"}')])
  source = open_shard(path)
  assert [list(source[i]["captions"]) for i in range(3)] == [
      [b"from txt"], [b"from json"], [b"x", b"y"]]
  assert source[0]["key"] == "a/0001" and source[0]["image"].shape == (4, 4, 3)
  with pytest.raises(UsageError, match=r"s\.tar, example a/0004: image does "
                     "not decode"):
    source[3]  # pylint: disable=pointless-statement
  with pytest.raises(UsageError, match="example a/0005: no caption"):
    source[4]  # pylint: disable=pointless-statement


# --------------------------------------------------------------------- CLI


def test_repack_cli_writes_once_and_never_overwrites(tmp_path, data_dir,
                                                     capsys, coco):
  argv = ["repack", "--dataset", "coco_mini", "--data_dir", data_dir,
          "--splits", "test", "--shards", "3", "--out", str(tmp_path),
          "--image_format", "jpg"]
  assert wds.main(argv) == 0
  out = capsys.readouterr().out
  assert f"config.dataset = wds:{tmp_path}/{{split}}/{{00000..00002}}.tar" in out
  shards = sorted((tmp_path / "test").glob("*.tar"))
  assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
  before = [p.read_bytes() for p in shards]
  source = open_shard(tmp_path / "test" / "*.tar")
  assert len(source) == TEST
  for i in (0, TEST - 1):  # JPEG quality 95 (4:2:0): close, not equal; two
    diff = np.abs(source[i]["image"].astype(int) -  # photos differ by ~50
                  coco["test"][i]["image"].astype(int))
    assert 0 < diff.mean() < 8, diff.mean()

  assert wds.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: shard ") and "never overwrites" in err
  assert err.count("\n") == 1
  assert [p.read_bytes() for p in shards] == before
  assert wds.main(["repack", "--out", str(tmp_path), "--shards", "x"]) == 2
  assert capsys.readouterr().err.startswith("error: argument --shards")


# ------------------------------------------- SIGKILL through the trainer


def test_lit_on_shards_killed_and_resumed_is_bit_identical(pattern, tmp_path):
  """LiT from the tiny CLIP on the 8 shards, SIGKILLed after its step-20
  checkpoint and resumed by the same command: the final state (parameters,
  optimizer, data position) equals an uninterrupted run's bit for bit."""
  # pylint: disable-next=import-outside-toplevel
  import orbax.checkpoint as ocp
  repo = pathlib.Path(__file__).resolve().parents[1]
  clip = repo / "tests" / "data" / "clip_tiny_hf"

  def command(workdir):
    return [sys.executable, "-m", "mmjax.train", "--config",
            f"configs/lit_clip.py:clip={clip},smoke", "--workdir",
            str(workdir), f"--config.dataset={pattern}",
            "--config.eval_splits=()", "--config.checkpoint_every=10"]

  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  run = lambda workdir: subprocess.run(command(workdir), cwd=repo, env=env,
                                       capture_output=True, text=True,
                                       timeout=600)
  reference = run(tmp_path / "ref")
  assert reference.returncode == 0, reference.stderr
  proc = subprocess.Popen(command(tmp_path / "run"), cwd=repo, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = tmp_path / "run" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not (
      checkpoints / "20").is_dir():
    time.sleep(0.05)
  assert proc.poll() is None, "training ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed = run(tmp_path / "run")
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from step" in resumed.stdout + resumed.stderr
  a, b = (ocp.StandardCheckpointer().restore(d / "checkpoints" / "40" / "state")
          for d in (tmp_path / "ref", tmp_path / "run"))
  flat_a, flat_b = ocp.tree.to_flat_dict(a), ocp.tree.to_flat_dict(b)
  assert flat_a.keys() == flat_b.keys()
  for path in flat_a:
    np.testing.assert_array_equal(flat_a[path], flat_b[path],
                                  err_msg=str(path))
