"""Tests of the local tfds builders (mmjax.data.builders).

Builds go into pytest tmp dirs, once per session. MNIST, FSDD and avmnist/clean
are built in full; the noisy avmnist (whose spectrograms make it the slow one)
is built from a small MNIST subset (7,000 train / 1,000 test images, the real
FSDD), twice, for determinism. Set MMJAX_FULL_BUILD=1 to also build the full
noisy avmnist (about 30-60 s more).
"""

from __future__ import annotations

import csv
import os
import pickle
import shutil

import numpy as np
import pytest
import scipy.ndimage
import scipy.signal
import soundfile as sf
import tensorflow_datasets as tfds

from mmjax.data import builders
from mmjax.data.builders import avmnist as avmnist_lib
from mmjax.errors import UsageError

SOURCE = builders.DEFAULT_SOURCE_DIR
N_SMALL_TRAIN, N_SMALL_TEST = 7000, 1000


@pytest.fixture(scope="session")
def mnist_arrays():
  with np.load(SOURCE / "mnist" / "mnist.npz") as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def fsdd_rows():
  with open(SOURCE / "fsdd" / "index.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    for k in ("digit", "take", "n_samples", "sample_rate"):
      r[k] = int(r[k])
  return rows


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def small_source(subset_source):
  return subset_source(N_SMALL_TRAIN, N_SMALL_TEST)


def _build_small(tmp_path_factory, source):
  return builders.get_builder("avmnist", str(tmp_path_factory.mktemp("av")),
                              source_dir=str(source))


@pytest.fixture(scope="session")
def small_noisy(tmp_path_factory, small_source):
  return _build_small(tmp_path_factory, small_source)


@pytest.fixture(scope="session")
def full_mnist(data_dir):
  return builders.get_builder("mnist", str(data_dir))


@pytest.fixture(scope="session")
def full_fsdd(data_dir):
  return builders.get_builder("fsdd", str(data_dir))


@pytest.fixture(scope="session")
def full_clean(data_dir):
  return builders.get_builder("avmnist/clean", str(data_dir))


def _items(source, indices):
  return source.__getitems__([int(i) for i in indices])


def _labels(source):
  return np.array([e["label"] for e in _items(source, range(len(source)))])


def _expected_recordings(labels, rows, test):
  """Independent statement of the pairing: index.csv rows, by image."""
  out = []
  seen = {d: 0 for d in range(10)}
  pools = {
      d: sorted((r for r in rows
                 if r["digit"] == d and r["speaker"] in avmnist_lib.AVMNIST_SPEAKERS
                 and (r["take"] >= 40) == test),
                key=lambda r: (r["speaker"], r["take"]))
      for d in range(10)}
  assert all(len(p) == (40 if test else 160) for p in pools.values())
  for y in labels:
    out.append(pools[y][seen[y] % len(pools[y])])
    seen[y] += 1
  return out


# --------------------------------------------------------------------- mnist


def test_mnist(full_mnist, mnist_arrays):
  ds = full_mnist.as_data_source()
  assert {k: len(v) for k, v in ds.items()} == {"train": 60000, "test": 10000}
  for split in ("train", "test"):
    n = len(ds[split])
    idx = [0, 1, n // 2, n - 1]
    for i, e in zip(idx, _items(ds[split], idx)):
      assert e["image"].shape == (28, 28, 1) and e["image"].dtype == np.uint8
      np.testing.assert_array_equal(e["image"][..., 0],
                                    mnist_arrays[f"x_{split}"][i])
      assert e["label"] == mnist_arrays[f"y_{split}"][i]


def test_not_in_tfds_registry():
  registry = tfds.core.registered._DATASET_REGISTRY  # pylint: disable=protected-access
  for cls in builders.BUILDERS.values():
    assert cls not in registry.values()
  assert builders.Mnist.name == "mnist"


# ---------------------------------------------------------------------- fsdd


def test_fsdd(full_fsdd, fsdd_rows):
  ds = full_fsdd.as_data_source()
  assert {k: len(v) for k, v in ds.items()} == {"train": 2700, "test": 300}
  names = full_fsdd.info.features["speaker"].names
  assert sorted(names) == sorted({r["speaker"] for r in fsdd_rows})
  for split in ("train", "test"):
    rows = [r for r in fsdd_rows if r["split"] == split]
    assert all((r["take"] <= 4) == (split == "test") for r in rows)
    idx = [0, 7, len(rows) - 1]
    for i, e in zip(idx, _items(ds[split], idx)):
      r = rows[i]
      assert e["audio"].dtype == np.int16 and e["audio"].shape == (r["n_samples"],)
      assert (e["label"], names[e["speaker"]], e["take"]) == (
          r["digit"], r["speaker"], r["take"])
      wav, rate = sf.read(SOURCE / "fsdd" / r["file"], dtype="int16")
      assert rate == 8000
      np.testing.assert_array_equal(e["audio"], wav)


# ------------------------------------------------------------------- avmnist


def test_avmnist_clean_pairing(full_clean, mnist_arrays, fsdd_rows):
  ds = full_clean.as_data_source()
  assert {k: len(v) for k, v in ds.items()} == {
      "train": 55000, "val": 5000, "test": 10000}
  y_train, y_test = mnist_arrays["y_train"], mnist_arrays["y_test"]
  parts = {"train": (y_train, slice(0, 55000), False),
           "val": (y_train, slice(55000, None), False),
           "test": (y_test, slice(None), True)}
  audio_cache = {}
  for split, (y, s, test) in parts.items():
    # Labels of every record: the MNIST labels, in MNIST order.
    np.testing.assert_array_equal(_labels(ds[split]), y[s])
    expected = _expected_recordings(y, fsdd_rows, test)[s]
    x = mnist_arrays["x_test" if test else "x_train"][s]
    idx = np.unique(np.r_[np.arange(0, len(expected), 97), len(expected) - 1])
    for i, e in zip(idx, _items(ds[split], idx)):
      r = expected[i]
      assert r["digit"] == e["label"]          # image digit == audio digit
      if r["file"] not in audio_cache:
        audio_cache[r["file"]] = sf.read(SOURCE / "fsdd" / r["file"],
                                         dtype="int16")[0]
      np.testing.assert_array_equal(e["audio"], audio_cache[r["file"]])
      assert e["image"].shape == (28, 28, 1)
      np.testing.assert_array_equal(e["image"][..., 0], x[i])


def test_avmnist_noisy_small(small_noisy, mnist_arrays):
  assert small_noisy.builder_config.name == (
      f"noisy_snr{avmnist_lib._num_tag(avmnist_lib.AVMNIST_SNR_DB)}db")  # pylint: disable=protected-access
  ds = small_noisy.as_data_source()
  n_train = N_SMALL_TRAIN - avmnist_lib.VAL_SIZE
  assert {k: len(v) for k, v in ds.items()} == {
      "train": n_train, "val": avmnist_lib.VAL_SIZE, "test": N_SMALL_TEST}
  y = mnist_arrays["y_train"]
  np.testing.assert_array_equal(_labels(ds["train"]), y[:n_train])
  np.testing.assert_array_equal(_labels(ds["val"]), y[n_train:N_SMALL_TRAIN])
  np.testing.assert_array_equal(_labels(ds["test"]),
                                mnist_arrays["y_test"][:N_SMALL_TEST])
  e = ds["val"][3]
  assert e["audio"].shape == (112, 112, 1) and e["audio"].dtype == np.uint8
  assert e["audio"].min() == 0 and e["audio"].max() == 255
  assert e["image"].shape == (28, 28, 1) and e["image"].dtype == np.uint8
  # The images are the PCA reconstruction fit on the (subset) train images.
  rec, stats = avmnist_lib.pca_reconstruct(
      mnist_arrays["x_train"][:N_SMALL_TRAIN], 0.25)
  np.testing.assert_array_equal(e["image"][..., 0], rec[n_train + 3])
  meta = small_noisy.info.metadata
  assert meta["pca"]["train"]["k"] == stats["k"]
  assert meta["snr_db"] == avmnist_lib.AVMNIST_SNR_DB


def test_avmnist_noisy_deterministic(small_noisy, small_source,
                                     tmp_path_factory):
  again = _build_small(tmp_path_factory, small_source)
  assert again.data_path != small_noisy.data_path
  a, b = small_noisy.as_data_source(), again.as_data_source()
  for split in a:
    idx = range(len(a[split]))
    for x, y in zip(_items(a[split], idx), _items(b[split], idx)):
      np.testing.assert_array_equal(x["audio"], y["audio"])
      np.testing.assert_array_equal(x["image"], y["image"])


def test_pca_full_mnist(mnist_arrays):
  """The documented k values and energy removed, on the full MNIST splits."""
  for part in ("train", "test"):
    x = mnist_arrays[f"x_{part}"]
    rec, stats = avmnist_lib.pca_reconstruct(x, 0.25)
    assert stats["k"] == 4, stats
    assert 0.25 < stats["explained_variance_kept"] < 0.32, stats
    assert 0.65 < stats["energy_removed"] < 0.80, stats
    assert rec.shape == x.shape and rec.dtype == np.uint8


def test_spectrogram_matches_scipy_reference():
  rng = np.random.default_rng(0)
  waves = (rng.standard_normal((3, 8000)) * np.linspace(0.01, 0.5, 8000)
           ).astype(np.float32)
  got = avmnist_lib.log_spectrogram(waves)
  assert got.shape == (3, 112, 112) and got.dtype == np.uint8
  for w, g in zip(waves, got):
    _, _, psd = scipy.signal.spectrogram(
        w.astype(np.float64), fs=8000, window=np.hanning(256), nperseg=256,
        noverlap=128, detrend=False, scaling="density", mode="psd")
    assert psd.shape == (129, 61)
    db = 10 * np.log10(psd + 1e-20)
    def coords(n_in):
      return np.clip((np.arange(112) + 0.5) * n_in / 112 - 0.5, 0, n_in - 1)
    fy, tx = np.meshgrid(coords(129), coords(61), indexing="ij")
    ref = scipy.ndimage.map_coordinates(db, [fy, tx], order=1, mode="nearest")
    ref = np.rint((ref - ref.min()) / (ref.max() - ref.min()) * 255)
    assert np.abs(ref - g).max() <= 1


def test_snr_configs_get_their_own_directory(tmp_path):
  cfg = builders.AvmnistConfig(name="snr_m5", snr_db=-5.0)
  assert cfg.name == "snr_m5_snrm5db" and cfg.short_name == "snr_m5"
  b = builders.Avmnist(config=cfg, data_dir=str(tmp_path))
  default = builders.Avmnist(data_dir=str(tmp_path))
  assert b.data_path != default.data_path
  assert b.builder_config.snr_db == -5.0
  assert default.builder_config.snr_db == avmnist_lib.AVMNIST_SNR_DB
  # Idempotent naming; "avmnist/noisy" resolves to the default config.
  assert builders.AvmnistConfig(name=cfg.name, snr_db=-5.0).name == cfg.name


@pytest.mark.skipif(not os.environ.get("MMJAX_FULL_BUILD"),
                    reason="set MMJAX_FULL_BUILD=1 to build the full noisy avmnist")
def test_avmnist_noisy_full(data_dir, mnist_arrays):
  b = builders.get_builder("avmnist/noisy", str(data_dir))
  ds = b.as_data_source()
  assert {k: len(v) for k, v in ds.items()} == {
      "train": 55000, "val": 5000, "test": 10000}
  assert [b.info.metadata["pca"][p]["k"] for p in ("train", "test")] == [4, 4]
  np.testing.assert_array_equal(_labels(ds["test"]), mnist_arrays["y_test"])


# -------------------------------------------------------------------- errors


def _one_line_error(excinfo):
  msg = str(excinfo.value)
  assert "\n" not in msg and msg
  return msg


def test_unknown_name(tmp_path):
  for name in ("imagenet", "avmnist/bogus", "mnist/noisy"):
    with pytest.raises(UsageError) as ei:
      builders.get_builder(name, str(tmp_path))
    msg = _one_line_error(ei)
    assert repr(name) in msg
    for known in ("mnist", "fsdd", "avmnist", "avmnist/noisy", "avmnist/clean"):
      assert known in msg


def test_missing_source_dir(tmp_path):
  missing = tmp_path / "no_such_dir"
  with pytest.raises(UsageError) as ei:
    builders.get_builder("mnist", str(tmp_path / "tfds"), source_dir=str(missing))
  assert str(missing) in _one_line_error(ei)


def test_missing_source_file(tmp_path):
  (tmp_path / "src" / "fsdd").mkdir(parents=True)
  with pytest.raises(UsageError) as ei:
    builders.get_builder("fsdd", str(tmp_path / "tfds"),
                         source_dir=str(tmp_path / "src"))
  assert str(tmp_path / "src" / "fsdd" / "index.csv") in _one_line_error(ei)


@pytest.fixture()
def fsdd_copy(tmp_path):
  src = tmp_path / "src"
  shutil.copytree(SOURCE / "fsdd", src / "fsdd")
  return src


def test_truncated_flac(fsdd_copy, tmp_path):
  bad = fsdd_copy / "fsdd" / "recordings" / "3_theo_7.flac"
  data = bad.read_bytes()
  bad.write_bytes(data[: len(data) // 2])
  with pytest.raises(UsageError) as ei:
    builders.get_builder("fsdd", str(tmp_path / "tfds"), source_dir=str(fsdd_copy))
  assert str(bad) in _one_line_error(ei)
  assert not (tmp_path / "tfds" / "fsdd" / "1.0.0").exists()


def test_short_but_valid_flac(fsdd_copy, tmp_path):
  bad = fsdd_copy / "fsdd" / "recordings" / "0_george_0.flac"
  audio, rate = sf.read(bad, dtype="int16")
  sf.write(bad, audio[: len(audio) // 2], rate, format="FLAC", subtype="PCM_16")
  with pytest.raises(UsageError) as ei:
    builders.get_builder("fsdd", str(tmp_path / "tfds"), source_dir=str(fsdd_copy))
  msg = _one_line_error(ei)
  assert str(bad) in msg and "samples" in msg


def test_prepared_builder_needs_no_source(full_fsdd, data_dir, tmp_path):
  b = builders.get_builder("fsdd", str(data_dir),
                           source_dir=str(tmp_path / "gone"))
  assert b.is_prepared() and len(b.as_data_source()["test"]) == 300
  again = pickle.loads(pickle.dumps(b))
  assert again.source_dir == tmp_path / "gone"
