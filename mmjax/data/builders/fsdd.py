"""Free Spoken Digit Dataset from the repo's compact FLAC copy (`data/fsdd/`)."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data.builders import _common


class Fsdd(_common.LocalBuilder, skip_registration=True):
  """Free Spoken Digit Dataset (Jakobovski et al., CC BY-SA 4.0), local copy.

  All 6 speakers (george, jackson, lucas, nicolas, theo, yweweler), 10 digits,
  50 takes each: 3,000 mono 8 kHz recordings. Official split (FSDD README):
  takes 0-4 -> test (300), takes 5-49 -> train (2,700). Records within a split
  are ordered by (digit, speaker, take), as in data/fsdd/index.csv.
  Features: audio int16 [None] (raw 8 kHz waveform, variable length), label
  ClassLabel(10) (the spoken digit), speaker ClassLabel(6 names), take int32.
  Source: <source_dir>/fsdd/index.csv and fsdd/recordings/*.flac (lossless).
  """

  name = "fsdd"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Local copy of FSDD (all 6 speakers), array_record."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self._make_info(
        description="Free Spoken Digit Dataset: spoken digits, 8 kHz int16.",
        features=tfds.features.FeaturesDict({
            "audio": _common.int16_waveform("8 kHz mono waveform"),
            "label": _common.label_feature(),
            "speaker": tfds.features.ClassLabel(names=_common.FSDD_SPEAKERS),
            "take": tfds.features.Scalar(dtype=np.int32,
                                         doc="recording index 0..49"),
        }),
        supervised_keys=("audio", "label"),
        homepage="https://github.com/Jakobovski/free-spoken-digit-dataset",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # no downloads: everything is local
    rows = _common.read_fsdd_index(self)
    # Read (and check) every file before writing anything.
    audio = [_common.read_fsdd_audio(self, r) for r in rows]
    splits = {}
    for split in ("train", "test"):
      keep = [i for i, r in enumerate(rows) if r["split"] == split]
      splits[split] = self._generate_examples(
          [rows[i] for i in keep], [audio[i] for i in keep])
    return splits

  def _generate_examples(self, rows, audio):
    for i, (row, wav) in enumerate(zip(rows, audio)):
      yield i, {"audio": wav, "label": row["digit"],
                "speaker": row["speaker"], "take": row["take"]}
