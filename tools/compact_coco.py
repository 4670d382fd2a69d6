#!/usr/bin/env python
"""Write the repo's compact, redistributable COCO-captions subset: data/coco_mini/.

Usage (needs Pillow: `pip install Pillow`; the mmjax builder does not):
  python tools/compact_coco.py --shared /work/shared/data --out data

Reads <shared>/coco_mini/ (271 COCO 2017 images with 5 human captions each, see
its PROVENANCE.md) and keeps ONLY the images whose Flickr licence allows
redistribution of modified copies: license_id 4 (CC BY 2.0) and 5 (CC BY-SA
2.0), 86 images / 430 captions. The NonCommercial and NoDerivs images are
dropped. What it writes (the `coco_mini` tfds builder reads only these):

  <out>/coco_mini/images.npz      images uint8 [N, 64, 64, 3] and image_ids
                                  int64 [N], np.savez_compressed, in the order
                                  of captions.jsonl (ascending image_id). Each
                                  image: decoded with PIL, converted to RGB (one
                                  source is grayscale), centre-cropped to the
                                  largest square, resized to 64x64 with LANCZOS.
  <out>/coco_mini/captions.jsonl  one JSON object per image: image_id,
                                  file_name (the original COCO file name),
                                  coco_split, width, height (of the original),
                                  license_id, license_name, license_url,
                                  flickr_url, coco_url, sha256 (of the original
                                  JPEG), source_repo, captions (the 5 human
                                  captions, unchanged).
  <out>/coco_mini/PROVENANCE.md   sources, what was kept and why, the resize,
                                  this command; the shared PROVENANCE.md quoted.
  <out>/coco_mini/LICENSE.md      the licences: captions CC BY 4.0 (COCO
                                  Consortium); every image listed with its own
                                  CC BY / CC BY-SA licence and Flickr URL.

Every original JPEG is checked against the sha256 and size in the shared
captions.jsonl. The pixels depend on Pillow's JPEG decoder and resampler: the
same Pillow version gives identical arrays.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pathlib
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

REDISTRIBUTABLE_LICENSE_IDS = (4, 5)   # CC BY 2.0, CC BY-SA 2.0
SIZE = 64
NUM_CAPTIONS = 5
OUT_FIELDS = (
    "image_id", "file_name", "coco_split", "width", "height", "license_id",
    "license_name", "license_url", "flickr_url", "coco_url", "sha256",
    "source_repo", "captions",
)
SHORT_LICENSE = {4: "CC BY 2.0", 5: "CC BY-SA 2.0"}


def redistributable(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
  """The records whose image licence is CC BY or CC BY-SA, by ascending image_id.

  Args:
    records: dicts with at least "image_id" and "license_id" (COCO licence ids:
      4 = Attribution, 5 = Attribution-ShareAlike; 1-3 and 6 are NonCommercial
      or NoDerivs, 7-8 are not used by COCO 2017 images).

  Returns:
    The kept records (the same dict objects), sorted by image_id.
  """
  kept = [r for r in records if r["license_id"] in REDISTRIBUTABLE_LICENSE_IDS]
  return sorted(kept, key=lambda r: r["image_id"])


def square_resize(data: bytes, size: int = SIZE) -> np.ndarray:
  """Encoded image bytes -> uint8 [size, size, 3]: RGB, centre crop, LANCZOS.

  The crop is the largest centred square, (w - s) // 2 from the left and
  (h - s) // 2 from the top with s = min(w, h); it is cut before resizing, so
  no pixel outside it contributes. EXIF orientation is not applied (COCO's
  annotations refer to the stored pixel grid).
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(io.BytesIO(data)) as img:
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    out = np.asarray(img, dtype=np.uint8)
  assert out.shape == (size, size, 3), out.shape
  return out


def _read_records(path: pathlib.Path) -> list[dict[str, Any]]:
  records = [json.loads(line) for line in path.read_text().splitlines()
             if line.strip()]
  ids = [r["image_id"] for r in records]
  if len(set(ids)) != len(ids):
    sys.exit(f"error: duplicate image_id in {path}")
  for r in records:
    caps = r["captions"]
    if (len(caps) != NUM_CAPTIONS
        or not all(isinstance(c, str) and c.strip() for c in caps)):
      sys.exit(f"error: {path}: image {r['image_id']} does not have "
               f"{NUM_CAPTIONS} non-empty captions")
  return records


def _check_original(src: pathlib.Path, r: dict[str, Any]) -> bytes:
  path = src / r["file_name"]
  data = path.read_bytes()
  if hashlib.sha256(data).hexdigest() != r["sha256"]:
    sys.exit(f"error: {path} does not match its sha256 in captions.jsonl")
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(io.BytesIO(data)) as img:
    if img.size != (r["width"], r["height"]):
      sys.exit(f"error: {path} is {img.size}, captions.jsonl says "
               f"{(r['width'], r['height'])}")
  return data


def _out_record(r: dict[str, Any]) -> dict[str, Any]:
  out = {k: r[k] for k in OUT_FIELDS}
  out["file_name"] = pathlib.PurePosixPath(r["file_name"]).name
  return out


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _provenance(src: pathlib.Path, out: pathlib.Path, records: Sequence[dict],
                n_all: int, counts: dict[int, int]) -> str:
  import PIL  # pylint: disable=import-outside-toplevel
  by_split = {s: sum(r["coco_split"] == s for r in records)
              for s in sorted({r["coco_split"] for r in records})}
  grey = [r["image_id"] for r in records if r.get("mode") != "RGB"]
  return (
      "# coco_mini: redistributable COCO Captions subset (64x64 RGB + 5 human "
      "captions)\n\n"
      f"{len(records)} COCO 2017 images, each with its 5 human captions "
      f"({NUM_CAPTIONS * len(records)} captions), as read by the mmjax "
      "`coco_mini` builder (mmjax/data/builders/coco_mini.py).\n\n"
      "## What was kept and why\n"
      f"The shared copy (`{src}`, provenance quoted below) holds {n_all} "
      "images under six different Flickr licences. Only images whose licence "
      "allows redistributing modified copies are kept: license_id 4 "
      "(Attribution, CC BY 2.0) and 5 (Attribution-ShareAlike, CC BY-SA 2.0): "
      f"{counts.get(4, 0)} + {counts.get(5, 0)} = {len(records)} images "
      f"({', '.join(f'{n} from {s}' for s, n in by_split.items())}). The "
      "NonCommercial (ids 1-3) and NoDerivs (ids 3, 6) images are not in this "
      "copy. The captions (COCO annotations, CC BY 4.0) are the official COCO "
      "records, unchanged. See LICENSE.md for every image's licence and "
      "attribution.\n\n"
      "## The change to the images\n"
      "Each original JPEG (sha256 checked against the shared captions.jsonl) "
      f"was decoded with Pillow {PIL.__version__}, converted to RGB "
      f"(grayscale originals: {', '.join(map(str, grey)) or 'none'}), "
      "centre-cropped to the largest square (offsets (w - s) // 2, "
      "(h - s) // 2 with s = min(w, h); no EXIF rotation) and resized to "
      "64x64 with LANCZOS. The result is stored losslessly as "
      "images.npz (np.savez_compressed): images uint8 [N, 64, 64, 3], "
      "image_ids int64 [N], row i = line i of captions.jsonl (ascending "
      f"image_id). images.npz sha256 {_sha256(out / 'images.npz')}.\n\n"
      "## Files\n"
      "- images.npz: the images, as above.\n"
      "- captions.jsonl: one JSON object per image: image_id, file_name "
      "(original COCO file name), coco_split, width, height (of the "
      "original), license_id, license_name, license_url, flickr_url, "
      "coco_url, sha256 (of the original JPEG, not in this repo), "
      "source_repo, captions (5).\n"
      "- LICENSE.md: licences and per-image attribution.\n\n"
      "## Regenerate\n"
      "    pip install Pillow\n"
      "    python tools/compact_coco.py --shared /work/shared/data --out data\n\n"
      "## Source provenance (shared copy's PROVENANCE.md, verbatim)\n\n"
      + "\n".join("> " + line if line else ">"
                  for line in (src / "PROVENANCE.md").read_text().splitlines())
      + "\n")


def _license_md(records: Sequence[dict]) -> str:
  rows = "\n".join(
      f"| {r['image_id']} | {r['file_name']} | {r['coco_split']} | "
      f"[{SHORT_LICENSE[r['license_id']]}]({r['license_url']}) | "
      f"{r['flickr_url']} | {r['coco_url']} |" for r in records)
  return (
      "# Licences of data/coco_mini\n\n"
      "These files are third-party data under their own licences (not the "
      "licence of the mmjax code).\n\n"
      "## Captions\n"
      "The captions are COCO Captions annotations, (c) COCO Consortium, "
      "licensed under the Creative Commons Attribution 4.0 License "
      "(CC BY 4.0, https://creativecommons.org/licenses/by/4.0/; "
      "https://cocodataset.org/#termsofuse). They are unchanged.\n"
      "Cite: T.-Y. Lin et al., \"Microsoft COCO: Common Objects in Context\", "
      "ECCV 2014; X. Chen et al., \"Microsoft COCO Captions: Data Collection "
      "and Evaluation Server\", arXiv:1504.00325, 2015.\n\n"
      "## Images\n"
      "Each image is a photograph from Flickr, collected by COCO, under the "
      "licence its Flickr owner chose, as recorded in the COCO 2017 "
      "annotations: Creative Commons Attribution 2.0 (CC BY 2.0, "
      "https://creativecommons.org/licenses/by/2.0/) or Attribution-ShareAlike "
      "2.0 (CC BY-SA 2.0, https://creativecommons.org/licenses/by-sa/2.0/). "
      "Attribution: the photo's Flickr URL below (COCO records no author "
      "names). Changes made: centre-cropped to a square and resized to 64x64 "
      "pixels (tools/compact_coco.py). Each modified image is distributed "
      "under the same licence as its original (for CC BY-SA 2.0 images this "
      "is required). No warranties are given; the licences' disclaimers "
      "apply.\n\n"
      "| image_id | original file | COCO split | licence | Flickr URL "
      "(attribution) | COCO URL |\n"
      "| --- | --- | --- | --- | --- | --- |\n" + rows + "\n")


def compact_coco(src: pathlib.Path, out: pathlib.Path) -> list[dict[str, Any]]:
  """Writes <out>/{images.npz,captions.jsonl,PROVENANCE.md,LICENSE.md}."""
  out.mkdir(parents=True, exist_ok=True)
  everything = _read_records(src / "captions.jsonl")
  kept = redistributable(everything)
  counts = {i: sum(r["license_id"] == i for r in kept)
            for i in REDISTRIBUTABLE_LICENSE_IDS}
  images = np.stack([square_resize(_check_original(src, r)) for r in kept])
  ids = np.array([r["image_id"] for r in kept], dtype=np.int64)
  np.savez_compressed(out / "images.npz", images=images, image_ids=ids)
  with np.load(out / "images.npz", allow_pickle=False) as z:  # round trip
    assert np.array_equal(z["images"], images)
    assert np.array_equal(z["image_ids"], ids)
  records = [_out_record(r) for r in kept]
  with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  (out / "PROVENANCE.md").write_text(
      _provenance(src, out, kept, len(everything), counts))
  (out / "LICENSE.md").write_text(_license_md(records))
  total = sum(p.stat().st_size for p in out.iterdir())
  print(f"coco_mini: {len(kept)} of {len(everything)} images "
        f"({counts[4]} CC BY, {counts[5]} CC BY-SA), "
        f"{NUM_CAPTIONS * len(kept)} captions -> {out} ({total / 1e6:.2f} MB)")
  return records


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shared", required=True, type=pathlib.Path,
                 help="shared data dir holding coco_mini/")
  p.add_argument("--out", required=True, type=pathlib.Path,
                 help="output dir (the repo's data/); writes <out>/coco_mini/")
  args = p.parse_args(argv)
  src = args.shared / "coco_mini"
  for sub in ("captions.jsonl", "PROVENANCE.md", "images"):
    if not (src / sub).exists():
      sys.exit(f"error: missing {src / sub}")
  compact_coco(src, args.out / "coco_mini")


if __name__ == "__main__":
  main()
