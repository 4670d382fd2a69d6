"""COCO Captions, redistributable 64x64 subset, from `data/coco_mini/`."""

from __future__ import annotations

import hashlib
import json
import zipfile
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data.builders import _common
from mmjax.errors import UsageError

COCO_MINI_CAPTIONS = "coco_mini/captions.jsonl"
COCO_MINI_IMAGES = "coco_mini/images.npz"
IMAGE_SHAPE = (64, 64, 3)
NUM_CAPTIONS = 5
LICENSE_IDS = (4, 5)   # CC BY 2.0, CC BY-SA 2.0 (COCO's Flickr licence ids)
TEST_SIZE = 20
_FIELDS = ("image_id", "license_id", "captions")


def split_key(image_id: int) -> str:
  """The sort key that picks the test images: sha256 of the decimal id, hex."""
  return hashlib.sha256(str(int(image_id)).encode()).hexdigest()


def held_out_ids(image_ids) -> set[int]:
  """The TEST_SIZE image ids with the smallest `split_key` (all if fewer)."""
  return set(sorted((int(i) for i in image_ids), key=split_key)[:TEST_SIZE])


def read_coco_mini(builder: _common.LocalBuilder
                   ) -> tuple[list[dict[str, Any]], np.ndarray]:
  """Records of captions.jsonl and the images [N, 64, 64, 3], checked.

  Checks: every line parses and has image_id, license_id (4 or 5) and 5
  non-empty string captions; image ids are unique; images.npz holds images
  uint8 [N, 64, 64, 3] and image_ids equal to captions.jsonl's, in its order.
  Any problem raises UsageError naming the file.
  """
  path = builder.source_path(COCO_MINI_CAPTIONS)
  records = []
  try:
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        r = json.loads(line)
        missing = [k for k in _FIELDS if k not in r]
        if missing:
          raise UsageError(f"bad coco_mini captions {path}: line {n} lacks "
                           f"{', '.join(missing)}")
        caps = r["captions"]
        if (not isinstance(caps, list) or len(caps) != NUM_CAPTIONS
            or not all(isinstance(c, str) and c.strip() for c in caps)):
          raise UsageError(f"bad coco_mini captions {path}: line {n} does not "
                           f"hold {NUM_CAPTIONS} non-empty captions")
        if r["license_id"] not in LICENSE_IDS:
          raise UsageError(
              f"coco_mini captions {path}: image {r['image_id']} has licence "
              f"id {r['license_id']}, only {LICENSE_IDS} are redistributable")
        records.append({"image_id": int(r["image_id"]), "captions": caps})
  except (ValueError, TypeError, UnicodeDecodeError) as e:
    raise UsageError(f"bad coco_mini captions {path}: {_common.one_line(e)}"
                     ) from e
  ids = [r["image_id"] for r in records]
  if not ids or len(set(ids)) != len(ids):
    raise UsageError(f"bad coco_mini captions {path}: empty or duplicate "
                     "image ids")

  path = builder.source_path(COCO_MINI_IMAGES)
  try:
    with np.load(path, allow_pickle=False) as z:
      images, image_ids = z["images"], z["image_ids"]
  except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
    raise UsageError(f"cannot read coco_mini images {path}: "
                     f"{_common.one_line(e)}") from e
  if images.shape != (len(ids), *IMAGE_SHAPE) or images.dtype != np.uint8:
    raise UsageError(f"coco_mini images {path}: {images.shape} {images.dtype}, "
                     f"expected ({len(ids)}, 64, 64, 3) uint8")
  if image_ids.shape != (len(ids),) or not np.array_equal(image_ids, ids):
    raise UsageError(f"coco_mini images {path}: image_ids differ from "
                     f"{COCO_MINI_CAPTIONS}")
  return records, images


class CocoMini(_common.LocalBuilder, skip_registration=True):
  """COCO Captions (Lin et al. ECCV 2014; Chen et al. 2015), redistributable mini.

  86 COCO 2017 photos whose Flickr licence is CC BY 2.0 (49) or CC BY-SA 2.0
  (37), each centre-cropped to a square and resized to 64x64 RGB (LANCZOS),
  with its 5 human captions (430 captions, COCO annotations, CC BY 4.0). The
  NonCommercial / NoDerivs images of the source are not included. Per-image
  licences and attribution: data/coco_mini/LICENSE.md.

  Splits (deterministic): test = the 20 images whose sha256(str(image_id)) hex
  digests are smallest (`held_out_ids`), train = the other 66. Records within a
  split are in ascending image_id order.
  Features: image uint8 [64, 64, 3]; captions [5] UTF-8 text (the data source
  returns a numpy object array of 5 `bytes`; `.decode()` each); image_id int64
  (the COCO image id).
  Source: <source_dir>/coco_mini/captions.jsonl and images.npz (written by
  tools/compact_coco.py; see data/coco_mini/PROVENANCE.md).
  """

  name = "coco_mini"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "86 CC BY / CC BY-SA COCO images, 64x64, 5 captions, array_record."}

  def check_source_dir(self) -> None:
    if not self.source_dir.is_dir():
      raise UsageError(
          f"dataset source directory not found: {self.source_dir} (write it "
          "with: python tools/compact_coco.py --shared <dir> --out data)")

  def _info(self) -> tfds.core.DatasetInfo:
    return self._make_info(
        description=("COCO Captions mini: 86 CC BY / CC BY-SA photos, 64x64 "
                     "RGB, 5 human captions each."),
        features=tfds.features.FeaturesDict({
            "image": _common.uint8_image(IMAGE_SHAPE, "64x64 RGB, 0..255"),
            # Object tensor of strings: stored as bytes, read back without
            # TensorFlow as a numpy object array of 5 `bytes`.
            "captions": tfds.features.Tensor(
                shape=(NUM_CAPTIONS,), dtype=np.object_,
                doc="the 5 human captions, UTF-8"),
            "image_id": tfds.features.Scalar(dtype=np.int64,
                                             doc="COCO image id"),
        }),
        homepage="https://cocodataset.org/",
        citation=("Lin et al., Microsoft COCO: Common Objects in Context, "
                  "ECCV 2014. Chen et al., Microsoft COCO Captions: Data "
                  "Collection and Evaluation Server, arXiv:1504.00325, 2015."),
        license=("captions CC BY 4.0 (COCO Consortium); images CC BY 2.0 or "
                 "CC BY-SA 2.0, per image, see data/coco_mini/LICENSE.md"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # no downloads: everything is local
    records, images = read_coco_mini(self)
    test = held_out_ids(r["image_id"] for r in records)
    splits = {}
    for split in ("train", "test"):
      keep = sorted((i for i, r in enumerate(records)
                     if (r["image_id"] in test) == (split == "test")),
                    key=lambda i: records[i]["image_id"])
      splits[split] = self._generate_examples(
          [records[i] for i in keep], images[keep])
    return splits

  def _generate_examples(self, records, images):
    for i, (r, image) in enumerate(zip(records, images)):
      yield i, {"image": image, "captions": np.array(r["captions"], object),
                "image_id": r["image_id"]}
