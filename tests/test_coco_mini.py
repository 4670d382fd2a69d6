"""coco_mini: the compact copy in data/coco_mini, its tool and its tfds builder."""

import importlib.util
import json
import pathlib
import shutil

import numpy as np
import pytest

from mmjax.data import builders
from mmjax.data.builders import coco_mini as coco_lib
from mmjax.errors import UsageError

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCE = builders.DEFAULT_SOURCE_DIR
COPY = SOURCE / "coco_mini"
SHARED = REPO.parent / "shared" / "data"


def _load_tool():
  spec = importlib.util.spec_from_file_location(
      "compact_coco", REPO / "tools" / "compact_coco.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


compact_coco = _load_tool()


@pytest.fixture(scope="module")
def records():
  with open(COPY / "captions.jsonl", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def arrays():
  with np.load(COPY / "images.npz", allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def built(data_dir):
  return builders.get_builder("coco_mini", str(data_dir))


def _one_line_error(excinfo):
  msg = str(excinfo.value)
  assert "\n" not in msg and msg
  return msg


# -------------------------------------------------------------- compact copy


def test_compact_copy_only_redistributable(records, arrays):
  assert len(records) == 86
  assert {r["license_id"] for r in records} == {4, 5}
  assert sum(r["license_id"] == 4 for r in records) == 49
  assert sum(len(r["captions"]) for r in records) == 430
  ids = [r["image_id"] for r in records]
  assert ids == sorted(set(ids))
  assert arrays["images"].shape == (86, 64, 64, 3)
  assert arrays["images"].dtype == np.uint8
  np.testing.assert_array_equal(arrays["image_ids"], ids)
  licence_md = (COPY / "LICENSE.md").read_text()
  for r in records:
    assert f"| {r['image_id']} | {r['file_name']} |" in licence_md
    assert r["flickr_url"] in licence_md
  assert "CC BY 4.0" in licence_md
  total = sum(p.stat().st_size for p in COPY.iterdir())
  assert total < 2_000_000, total


def test_redistributable_selection():
  fake = [{"image_id": 30, "license_id": 5}, {"image_id": 7, "license_id": 1},
          {"image_id": 12, "license_id": 4}, {"image_id": 3, "license_id": 6},
          {"image_id": 9, "license_id": 3}, {"image_id": 1, "license_id": 2},
          {"image_id": 2, "license_id": 4}, {"image_id": 4, "license_id": 7}]
  kept = compact_coco.redistributable(fake)
  assert [(r["image_id"], r["license_id"]) for r in kept] == [
      (2, 4), (12, 4), (30, 5)]


def test_square_resize_takes_the_centre():
  image_lib = pytest.importorskip("PIL.Image")
  import io  # pylint: disable=import-outside-toplevel
  # 100 wide, 60 high: red side bands of 20, a green 60x60 centre.
  x = np.zeros((60, 100, 3), np.uint8)
  x[..., 0] = 255
  x[:, 20:80] = (0, 200, 0)
  buf = io.BytesIO()
  image_lib.fromarray(x).save(buf, format="PNG")
  out = compact_coco.square_resize(buf.getvalue())
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.broadcast_to([0, 200, 0], out.shape))


@pytest.mark.skipif(not (SHARED / "coco_mini" / "captions.jsonl").exists(),
                    reason="needs the shared coco_mini source")
def test_tool_regenerates_the_copy(tmp_path, records, arrays):
  pytest.importorskip("PIL")
  compact_coco.main(["--shared", str(SHARED), "--out", str(tmp_path)])
  out = tmp_path / "coco_mini"
  assert ((out / "captions.jsonl").read_text()
          == (COPY / "captions.jsonl").read_text())
  assert (out / "LICENSE.md").read_text() == (COPY / "LICENSE.md").read_text()
  with np.load(out / "images.npz") as z:
    np.testing.assert_array_equal(z["image_ids"], arrays["image_ids"])
    # Equal with the Pillow that wrote the copy; JPEG decoders may differ by 1-2.
    diff = np.abs(z["images"].astype(int) - arrays["images"].astype(int))
    assert diff.max() <= 3, diff.max()


# ------------------------------------------------------------------- builder


def test_builder_splits_and_features(built, records, arrays):
  assert "coco_mini" in builders.known_names()
  ds = built.as_data_source()
  assert {k: len(v) for k, v in ds.items()} == {"train": 66, "test": 20}
  by_id = {r["image_id"]: (i, r) for i, r in enumerate(records)}
  seen = {}
  for split, source in ds.items():
    examples = source.__getitems__(list(range(len(source))))
    ids = [int(e["image_id"]) for e in examples]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    seen[split] = set(ids)
    for e in examples:
      i, r = by_id[int(e["image_id"])]
      assert e["image"].shape == (64, 64, 3) and e["image"].dtype == np.uint8
      np.testing.assert_array_equal(e["image"], arrays["images"][i])
      caps = e["captions"]
      assert isinstance(caps, np.ndarray) and caps.shape == (5,)
      assert all(isinstance(c, bytes) for c in caps)
      text = [c.decode("utf-8") for c in caps]
      assert all(t.strip() for t in text)
      assert text == r["captions"]
  assert not seen["train"] & seen["test"]
  assert seen["train"] | seen["test"] == set(by_id)
  assert seen["test"] == coco_lib.held_out_ids(by_id)
  assert built.info.features["image_id"].np_dtype == np.int64


def test_held_out_ids_is_the_hash_order():
  ids = list(range(100, 160))
  got = coco_lib.held_out_ids(ids)
  assert len(got) == coco_lib.TEST_SIZE
  worst = max(coco_lib.split_key(i) for i in got)
  assert all(coco_lib.split_key(i) > worst for i in set(ids) - got)
  assert coco_lib.held_out_ids(ids[::-1]) == got


def test_prepared_builder_needs_no_source(built, data_dir, tmp_path):
  b = builders.get_builder("coco_mini", str(data_dir),
                           source_dir=str(tmp_path / "gone"))
  assert b.is_prepared() and len(b.as_data_source()["test"]) == 20


# -------------------------------------------------------------------- errors


def test_missing_source_dir(tmp_path):
  missing = tmp_path / "no_such_dir"
  with pytest.raises(UsageError) as ei:
    builders.get_builder("coco_mini", str(tmp_path / "tfds"),
                         source_dir=str(missing))
  msg = _one_line_error(ei)
  assert str(missing) in msg and "compact_coco.py" in msg


def test_missing_source_file(tmp_path):
  (tmp_path / "src").mkdir()
  with pytest.raises(UsageError) as ei:
    builders.get_builder("coco_mini", str(tmp_path / "tfds"),
                         source_dir=str(tmp_path / "src"))
  assert str(tmp_path / "src" / "coco_mini" / "captions.jsonl") in (
      _one_line_error(ei))


def _edit_captions(path, edit):
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  edit(rows)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("damage,culprit", [
    ("licence", "captions.jsonl"), ("captions", "captions.jsonl"),
    ("order", "images.npz"), ("truncated", "images.npz")])
def test_bad_source(tmp_path, damage, culprit):
  src = tmp_path / "src"
  shutil.copytree(COPY, src / "coco_mini")
  target = src / "coco_mini"
  if damage == "licence":
    _edit_captions(target / "captions.jsonl",
                   lambda rows: rows[3].update(license_id=2))
  elif damage == "captions":
    _edit_captions(target / "captions.jsonl",
                   lambda rows: rows[5].update(captions=rows[5]["captions"][:4]))
  elif damage == "order":
    _edit_captions(target / "captions.jsonl",
                   lambda rows: rows.insert(0, rows.pop(1)))
  else:
    data = (target / "images.npz").read_bytes()
    (target / "images.npz").write_bytes(data[: len(data) // 2])
  with pytest.raises(UsageError) as ei:
    builders.get_builder("coco_mini", str(tmp_path / "tfds"),
                         source_dir=str(src))
  assert str(target / culprit) in _one_line_error(ei)
  assert not (tmp_path / "tfds" / "coco_mini" / "1.0.0").exists()
