#!/usr/bin/env python
"""Write the repo's compact copies of the raw datasets under data/.

Usage:
  python tools/compact_data.py --shared /work/shared/data --out data

What it writes (the mmjax tfds builders read only these, never --shared):

  <out>/mnist/mnist.npz         the MNIST arrays x_train (60000,28,28) uint8,
                                y_train (60000,) uint8, x_test (10000,28,28)
                                uint8, y_test (10000,) uint8, re-saved with
                                np.savez_compressed (same keys, same values).
  <out>/mnist/PROVENANCE.md     the source PROVENANCE.md plus a note on this copy.
  <out>/mnist/LICENSE_*         licence file(s) copied unchanged.
  <out>/fsdd/recordings/*.flac  the 3000 Free Spoken Digit Dataset recordings,
                                converted from 16-bit PCM WAV to FLAC (16-bit,
                                8 kHz, mono). FLAC is lossless: every file is
                                decoded again and compared sample-for-sample with
                                its WAV; the script fails on any difference.
  <out>/fsdd/index.csv          one row per recording: file, digit, speaker,
                                take, split (official: takes 0-4 test, 5-49
                                train), sample_rate, n_samples, sha256 (of the
                                FLAC file).
  <out>/fsdd/PROVENANCE.md      the source PROVENANCE.md plus a note on the FLAC
                                conversion.
  <out>/fsdd/README.md          the FSDD README (it carries the CC BY-SA 4.0
                                licence statement), copied unchanged.

The values are reproducible: the arrays and the decoded audio are identical on
every run. (The FLAC bytes, hence their sha256, depend on the libsndfile/libFLAC
version that encodes them; the audio they decode to does not.)
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import pathlib
import re
import shutil
import sys

import numpy as np
import soundfile as sf

MNIST_KEYS = {
    "x_train": ((60000, 28, 28), np.uint8),
    "y_train": ((60000,), np.uint8),
    "x_test": ((10000, 28, 28), np.uint8),
    "y_test": ((10000,), np.uint8),
}
FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
FSDD_RATE = 8000
FSDD_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")
INDEX_COLUMNS = (
    "file", "digit", "speaker", "take", "split", "sample_rate", "n_samples",
    "sha256",
)


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def compact_mnist(src: pathlib.Path, out: pathlib.Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  with np.load(src / "mnist.npz") as z:
    arrays = {k: z[k] for k in z.files}
  if set(arrays) != set(MNIST_KEYS):
    sys.exit(f"error: {src / 'mnist.npz'} has keys {sorted(arrays)}, "
             f"expected {sorted(MNIST_KEYS)}")
  for k, (shape, dtype) in MNIST_KEYS.items():
    if arrays[k].shape != shape or arrays[k].dtype != dtype:
      sys.exit(f"error: {src / 'mnist.npz'}:{k} is {arrays[k].shape} "
               f"{arrays[k].dtype}, expected {shape} {np.dtype(dtype)}")
  np.savez_compressed(out / "mnist.npz", **{k: arrays[k] for k in MNIST_KEYS})
  with np.load(out / "mnist.npz") as z:  # round-trip check
    for k in MNIST_KEYS:
      assert np.array_equal(z[k], arrays[k]), k

  licences = sorted(p.name for p in src.iterdir()
                    if p.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")))
  for name in licences:
    shutil.copyfile(src / name, out / name)
  note = (
      "\n## This copy (mmjax repo, data/mnist/)\n"
      f"Written by tools/compact_data.py from the shared copy's mnist.npz "
      f"(sha256 {_sha256(src / 'mnist.npz')}):\n"
      "the same four arrays (same keys, shapes, dtypes, values; checked on write), "
      "re-saved with np.savez_compressed.\n"
      f"mnist.npz sha256 {_sha256(out / 'mnist.npz')}.\n"
      f"Licence files copied unchanged: {', '.join(licences) or 'none'}.\n"
      "The raw_idx/ files and png_to_mnist_lut.npy mentioned above were used to "
      "assemble the shared copy and are not part of this repo.\n"
  )
  (out / "PROVENANCE.md").write_text((src / "PROVENANCE.md").read_text() + note)
  print(f"mnist: {out / 'mnist.npz'} "
        f"({(out / 'mnist.npz').stat().st_size / 1e6:.1f} MB)")


def compact_fsdd(src: pathlib.Path, out: pathlib.Path) -> None:
  rec_out = out / "recordings"
  rec_out.mkdir(parents=True, exist_ok=True)
  wavs = sorted((src / "recordings").glob("*.wav"))
  if len(wavs) != 3000:
    sys.exit(f"error: expected 3000 wav files in {src / 'recordings'}, "
             f"found {len(wavs)}")
  rows = []
  for wav in wavs:
    m = FSDD_NAME.match(wav.name)
    if not m or m.group(2) not in FSDD_SPEAKERS:
      sys.exit(f"error: unexpected FSDD file name {wav}")
    digit, speaker, take = int(m.group(1)), m.group(2), int(m.group(3))
    info = sf.info(str(wav))
    if (info.samplerate, info.channels, info.subtype) != (FSDD_RATE, 1, "PCM_16"):
      sys.exit(f"error: {wav} is {info.samplerate} Hz, {info.channels} ch, "
               f"{info.subtype}; expected 8000 Hz mono PCM_16")
    audio, _ = sf.read(str(wav), dtype="int16")
    flac = rec_out / (wav.stem + ".flac")
    buf = io.BytesIO()
    sf.write(buf, audio, FSDD_RATE, format="FLAC", subtype="PCM_16",
             compression_level=1.0)
    flac.write_bytes(buf.getvalue())
    back, rate = sf.read(str(flac), dtype="int16")
    if rate != FSDD_RATE or not np.array_equal(back, audio):
      sys.exit(f"error: FLAC round trip of {wav} is not lossless")
    rows.append({
        "file": f"recordings/{flac.name}",
        "digit": digit,
        "speaker": speaker,
        "take": take,
        "split": "test" if take <= 4 else "train",
        "sample_rate": FSDD_RATE,
        "n_samples": len(audio),
        "sha256": _sha256(flac),
    })
  rows.sort(key=lambda r: (r["digit"], r["speaker"], r["take"]))
  src_index = src / "index.csv"
  if src_index.exists():  # cross-check against the shared index
    with open(src_index, newline="") as f:
      shared = {pathlib.Path(r["file"]).stem: r for r in csv.DictReader(f)}
    for r in rows:
      s = shared.get(pathlib.Path(r["file"]).stem)
      if s is None or (int(s["n_samples"]), s["split"]) != (r["n_samples"], r["split"]):
        sys.exit(f"error: {r['file']} disagrees with {src_index}")
  with open(out / "index.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)

  shutil.copyfile(src / "README.md", out / "README.md")
  wav_bytes = sum(p.stat().st_size for p in wavs)
  flac_bytes = sum(p.stat().st_size for p in rec_out.glob("*.flac"))
  note = (
      "\n## This copy (mmjax repo, data/fsdd/)\n"
      "Written by tools/compact_data.py from the shared copy's recordings/*.wav.\n"
      "Converted to FLAC (16-bit, 8 kHz, mono; soundfile/libsndfile, compression "
      "level max) to keep the repo small: FLAC is lossless, and every file was "
      "decoded again and checked sample-for-sample identical to its WAV "
      f"({wav_bytes / 1e6:.1f} MB of WAV -> {flac_bytes / 1e6:.1f} MB of FLAC).\n"
      "index.csv: file, digit, speaker, take (the {index} in the file name), "
      "split (official: takes 0-4 test, 5-49 train), sample_rate, n_samples, "
      "sha256 of the FLAC file.\n"
      "README.md (with the CC BY-SA 4.0 licence statement) copied unchanged; "
      "metadata.py is not part of this copy.\n"
  )
  (out / "PROVENANCE.md").write_text((src / "PROVENANCE.md").read_text() + note)
  print(f"fsdd: {len(rows)} FLAC files in {rec_out} "
        f"({wav_bytes / 1e6:.1f} MB WAV -> {flac_bytes / 1e6:.1f} MB FLAC)")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shared", required=True, type=pathlib.Path,
                 help="shared data dir holding mnist/ and fsdd/")
  p.add_argument("--out", required=True, type=pathlib.Path,
                 help="output dir (the repo's data/)")
  args = p.parse_args(argv)
  for sub in ("mnist/mnist.npz", "mnist/PROVENANCE.md", "fsdd/recordings",
              "fsdd/README.md", "fsdd/PROVENANCE.md"):
    if not (args.shared / sub).exists():
      sys.exit(f"error: missing {args.shared / sub}")
  compact_mnist(args.shared / "mnist", args.out / "mnist")
  compact_fsdd(args.shared / "fsdd", args.out / "fsdd")


if __name__ == "__main__":
  main()
