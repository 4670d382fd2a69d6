"""AV-MNIST: MNIST images paired with spoken digits (FSDD), built locally.

See `Avmnist` for the protocol. `AVMNIST_SNR_DB` is the single knob of the
default (`noisy`) config; other SNRs get their own config (and directory):

  Avmnist(config=AvmnistConfig(name="snr_m5", snr_db=-5.0), data_dir=...)
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import os
from typing import Any, Iterator

import numpy as np
import scipy.fft
import scipy.sparse.linalg
import tensorflow_datasets as tfds

from mmjax.data.builders import _common
from mmjax.errors import UsageError

log = logging.getLogger(__name__)

# Signal-to-noise ratio (dB) of the white Gaussian noise added to the audio of
# the default `noisy` config, calibrated so that the audio-only LeNet of
# configs/avmnist.py (one epoch, seed 0) lands near MultiBench's ~43% test
# accuracy: measured 68.43% at -10 dB and 39.53% at -15 dB
# (experiments/avmnist_noise_calibration); -14.5 dB interpolates to ~43%.
AVMNIST_SNR_DB = -14.5

AVMNIST_SPEAKERS = ("jackson", "nicolas", "theo", "yweweler")
TEST_TAKES = range(40, 50)   # pair with MNIST test; takes 0-39 pair with train
VAL_SIZE = 5000              # last 5,000 MNIST train images
N_FFT = 256                  # matplotlib specgram defaults: NFFT 256,
HOP = 128                    # noverlap 128, Hann window
SPEC_SIZE = 112              # spectrogram image: 112 (freq) x 112 (time)
SAMPLE_RATE = _common.FSDD_RATE
_TINY = 1e-20                # added to the power before log10
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_BATCH = 512                 # examples per vectorised spectrogram batch
_THREADS = max(1, min(4, os.cpu_count() or 1))


def _num_tag(x: float) -> str:
  return f"{x:g}".replace("-", "m").replace(".", "p").replace("+", "")


@dataclasses.dataclass(eq=False)
class AvmnistConfig(tfds.core.BuilderConfig):
  """AV-MNIST variant.

  Attributes:
    clean: True -> full MNIST images and raw int16 waveforms (no PCA, noise,
      spectrogram); the fields below are then unused.
    snr_db: SNR of the added white Gaussian noise, in dB.
    audio_samples: fixed waveform length (zero-pad or cut), 8000 = 1 s.
    pca_variance: keep the fewest principal components whose cumulative
      explained-variance ratio exceeds this.
    noise_seed: base seed of the per-example noise.

  The noisy config's name gets a suffix with its parameters (always the SNR,
  e.g. "noisy_snr0db", "snr_m5_snrm5db"; the others only when not default), so
  builds with different parameters never share a directory. `short_name` keeps
  the name given.
  """

  clean: bool = False
  snr_db: float = AVMNIST_SNR_DB
  audio_samples: int = 8000
  pca_variance: float = 0.25
  noise_seed: int = 0

  def __post_init__(self):
    self.short_name = self.name
    if self.clean:
      return
    tag = f"snr{_num_tag(float(self.snr_db))}db"
    if self.audio_samples != 8000:
      tag += f"_len{int(self.audio_samples)}"
    if self.pca_variance != 0.25:
      tag += f"_pca{_num_tag(float(self.pca_variance))}"
    if self.noise_seed != 0:
      tag += f"_seed{int(self.noise_seed)}"
    if not self.name.endswith(tag):
      self.name = f"{self.name}_{tag}"


# ---------------------------------------------------------------------------
# Vectorised pieces (module-level so they can be tested and reused).


def pca_reconstruct(images: np.ndarray, variance: float
                    ) -> tuple[np.ndarray, dict[str, float]]:
  """Keeps the top-k principal components of `images` (N, H, W) uint8.

  PCA with mean-centering, fit on `images` themselves; k is the smallest number
  of components whose cumulative explained-variance ratio exceeds `variance`.
  Returns the reconstruction clipped and rounded to uint8 and a dict with k,
  the explained-variance ratio kept, and the fraction of the centered energy
  actually removed (measured after rounding).
  """
  n = len(images)
  x = images.reshape(n, -1).astype(np.float64)
  mean = x.mean(axis=0)
  xc = x - mean
  cov = xc.T @ xc
  total = float(np.trace(cov))          # = sum of all eigenvalues
  eigval, eigvec = _top_eigenpairs(cov, total, variance)
  ratio = np.cumsum(eigval) / total
  k = int(np.searchsorted(ratio, variance, side="right")) + 1
  vk = eigvec[:, :k]
  rec = (xc @ vk) @ vk.T + mean
  out = np.clip(np.rint(rec), 0, 255).astype(np.uint8)
  removed = float(((x - out) ** 2).sum() / (xc ** 2).sum())
  stats = {"k": k, "explained_variance_kept": float(ratio[k - 1]),
           "energy_removed": removed}
  return out.reshape(images.shape), stats


def _top_eigenpairs(cov: np.ndarray, total: float, variance: float
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Leading eigenpairs of `cov` (descending), enough to pass `variance`.

  Lanczos (ARPACK, fixed start vector, machine-precision tolerance) for the
  top few; LAPACK's full eigh only if they are not enough. (LAPACK's
  multithreaded eigh of MNIST's 784x784 covariance takes seconds on a busy
  2-core machine; the Lanczos solve takes well under one.)
  """
  d = cov.shape[0]
  m = 16
  if m < d - 1:
    val, vec = scipy.sparse.linalg.eigsh(cov, k=m, which="LA",
                                         v0=np.ones(d), tol=0)
    order = np.argsort(val)[::-1]
    val, vec = val[order], vec[:, order]
    if val.sum() / total > variance:
      return val, vec
  val, vec = np.linalg.eigh(cov)
  return val[::-1], vec[:, ::-1]


def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
  """(n_out, n_in) bilinear interpolation matrix, half-pixel centers."""
  src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  src = np.clip(src, 0, n_in - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in))
  m[np.arange(n_out), lo] += 1 - frac
  m[np.arange(n_out), hi] += frac
  return m


def log_spectrogram(waves: np.ndarray) -> np.ndarray:
  """(B, T) float waveforms -> (B, 112, 112) uint8 log-power spectrograms.

  As matplotlib's `specgram` defaults (Hann window of N_FFT=256, hop 128,
  one-sided PSD, 10*log10(power + 1e-20)): (N_FFT/2+1) = 129 freq bins x
  (T-256)//128+1 frames (61 for T=8000); then bilinear resize to 112 x 112
  (rows: frequency, low first; columns: time) and min-max normalisation per
  example to 0..255. Vectorised over the batch; float32.
  """
  waves = np.asarray(waves, dtype=np.float32)
  b = waves.shape[0]
  frames = np.lib.stride_tricks.sliding_window_view(waves, N_FFT, axis=-1)
  frames = frames[:, ::HOP]                                 # (B, F, N_FFT)
  window = np.hanning(N_FFT)
  spec = scipy.fft.rfft(frames * window.astype(np.float32), axis=-1)
  n_frames, n_freq = spec.shape[1:]                         # F, 129
  v = spec.view(np.float32)                                 # (B, F, 2*129)
  np.square(v, out=v)
  power = v[..., 0::2] + v[..., 1::2]                       # |X|^2
  # PSD = |X|^2 * scale (x2 off DC/Nyquist). In dB the scale is an offset per
  # bin, added after the (linear) frequency resize.
  scale = 1.0 / (SAMPLE_RATE * (window ** 2).sum())
  bin_scale = np.full(n_freq, 2.0 * scale)
  bin_scale[[0, -1]] = scale
  # 10*log10(|X|^2 * s + tiny) = 10*log10(|X|^2 + tiny/s) + 10*log10(s); the
  # doubled bins use tiny/(2s) instead of tiny/s: a negligible difference.
  power += np.float32(_TINY / (2.0 * scale))
  np.log10(power, out=power)
  r_freq = _bilinear_matrix(SPEC_SIZE, n_freq)              # (112, 129)
  r_time = _bilinear_matrix(SPEC_SIZE, n_frames).astype(np.float32)
  offset = (r_freq @ (10.0 * np.log10(bin_scale))).astype(np.float32)
  # Frequency resize as one GEMM: (B*F, 129) @ (129, 112) -> (B, F, 112).
  x = power.reshape(b * n_frames, n_freq) @ (10.0 * r_freq.T).astype(np.float32)
  x = np.matmul(r_time, x.reshape(b, n_frames, SPEC_SIZE))  # (B, time, freq)
  x += offset
  lo = x.min(axis=(1, 2), keepdims=True)
  hi = x.max(axis=(1, 2), keepdims=True)
  x -= lo
  x *= 255.0 / np.where(hi > lo, hi - lo, 1.0)
  np.rint(x, out=x)
  np.clip(x, 0, 255, out=x)
  return np.ascontiguousarray(x.astype(np.uint8).transpose(0, 2, 1))  # freq, time


def pair_recordings(labels: np.ndarray, pools: list[np.ndarray]) -> np.ndarray:
  """Index into the recordings for each image: the j-th image of digit d gets
  pools[d][j mod len(pools[d])]."""
  out = np.empty(len(labels), dtype=np.int64)
  for d in range(10):
    pos = np.flatnonzero(labels == d)
    out[pos] = pools[d][np.arange(len(pos)) % len(pools[d])]
  return out


def fixed_length(audio: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
  """int16 waveforms -> (R, n) float32 in [-1, 1] (zero-padded or cut) and the
  mean power of each clip's kept (non-padded) samples."""
  out = np.zeros((len(audio), n), dtype=np.float32)
  power = np.zeros(len(audio), dtype=np.float64)
  for i, a in enumerate(audio):
    a = a[:n].astype(np.float32) / 32768.0
    out[i, :len(a)] = a
    power[i] = float(np.mean(a.astype(np.float64) ** 2)) if len(a) else 0.0
  return out, power


# ---------------------------------------------------------------------------


class Avmnist(_common.LocalBuilder, skip_registration=True):
  """AV-MNIST: MNIST digits paired with spoken digits, MultiBench/MFAS protocol.

  Pairing. Each MNIST image is paired with an FSDD recording of the same digit
  by speakers jackson, nicolas, theo and yweweler. Recordings with takes 40-49
  pair with MNIST test (40 per digit), takes 0-39 with MNIST train (160 per
  digit). Each digit's list is sorted by speaker then take, and the j-th image
  of digit d in an MNIST split (counted over the whole split, in MNIST order:
  all 60,000 train images, all 10,000 test images) gets recording j mod n_d of
  that split's list for digit d.

  Splits (records in MNIST order): train = first 55,000 MNIST train images,
  val = last 5,000 MNIST train images, test = the 10,000 MNIST test images.

  Config `noisy_snr<SNR>db` (default; SNR = AVMNIST_SNR_DB):
    image: the MNIST image keeping only the smallest number k of principal
      components whose cumulative explained-variance ratio exceeds 0.25
      (mean-centered PCA fit per MNIST split: once on all 60,000 train images,
      serving train and val; once on the 10,000 test images), reconstructed to
      28x28, clipped and rounded to uint8. Measured on this repo's MNIST:
      train: k = 4 (cumulative explained-variance ratio 0.2836, so 71.6% of
      the variance is projected out; 70.9% of the centered energy is removed
      after rounding to uint8); test: k = 4 (0.2916; 70.8%, 70.1% after
      rounding). The MFAS paper describes this as removing ~75% of the energy.
    audio: the paired waveform as float in [-1, 1], zero-padded or cut to
      `audio_samples` (8000 = 1 s at 8 kHz), plus white Gaussian noise over the
      whole window with variance P / 10^(snr_db/10), P = mean power of the
      clip's non-padded samples. The noise RNG of example i of split s is
      numpy default_rng((noise_seed, {train: 0, val: 1, test: 2}[s], i)), so
      builds are reproducible. Then a log-power spectrogram as matplotlib's
      specgram defaults (Hann window, n_fft 256, hop 128, one-sided PSD,
      10*log10(power + 1e-20)): 129 freq bins x 61 frames, bilinearly resized
      to 112 x 112 (rows: frequency, low first; columns: time) and min-max
      normalised per example to uint8 0..255.
    Features: image uint8 [28,28,1], audio uint8 [112,112,1], label
      ClassLabel(10).
  Config `clean`: the same pairing and splits with the full MNIST images and
    the raw noise-free waveform. Features: image uint8 [28,28,1], audio int16
    [None] (8 kHz, variable length), label ClassLabel(10).

  The PCA statistics of a noisy build are in `builder.info.metadata["pca"]`.
  """

  name = "avmnist"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "AV-MNIST (MFAS protocol), array_record."}
  BUILDER_CONFIGS = [
      AvmnistConfig(
          name="noisy", snr_db=AVMNIST_SNR_DB,
          description="PCA-degraded images + spectrograms of noisy audio."),
      AvmnistConfig(
          name="clean", clean=True,
          description="Full MNIST images + raw noise-free waveforms."),
  ]

  @property
  def _config(self) -> AvmnistConfig:
    return self.builder_config

  def _info(self) -> tfds.core.DatasetInfo:
    if self._config.clean:
      audio = _common.int16_waveform("paired FSDD waveform, 8 kHz, noise-free")
      image = _common.uint8_image((28, 28, 1), "full MNIST image")
    else:
      audio = _common.uint8_image(
          (SPEC_SIZE, SPEC_SIZE, 1),
          f"log-power spectrogram (freq x time) of the paired waveform + "
          f"white noise at {self._config.snr_db:g} dB SNR, min-max to 0..255")
      image = _common.uint8_image(
          (28, 28, 1), "MNIST image reconstructed from top-k PCA components")
    return self._make_info(
        description=("AV-MNIST: MNIST images paired with FSDD spoken digits "
                     "(MFAS/MultiBench protocol)."),
        features=tfds.features.FeaturesDict({
            "image": image, "audio": audio,
            "label": _common.label_feature(),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # no downloads: everything is local
    cfg = self._config
    mnist = _common.load_mnist(self)
    if len(mnist["y_train"]) <= VAL_SIZE:
      raise UsageError(
          f"MNIST file {self.source_path(_common.MNIST_FILE)} has "
          f"{len(mnist['y_train'])} train images; avmnist needs more than "
          f"{VAL_SIZE} (the last {VAL_SIZE} are the val split)")
    rows = [r for r in _common.read_fsdd_index(self)
            if r["speaker"] in AVMNIST_SPEAKERS]
    rows.sort(key=lambda r: (r["digit"], r["speaker"], r["take"]))
    audio = [_common.read_fsdd_audio(self, r) for r in rows]
    digits = np.array([r["digit"] for r in rows])
    is_test = np.array([r["take"] in TEST_TAKES for r in rows])
    pools = {
        "train": [np.flatnonzero((digits == d) & ~is_test) for d in range(10)],
        "test": [np.flatnonzero((digits == d) & is_test) for d in range(10)],
    }
    for part, pool in pools.items():
      if any(len(p) == 0 for p in pool):
        raise UsageError(
            f"FSDD index {self.source_path(_common.FSDD_INDEX)} has no "
            f"{part} recording for some digit of speakers "
            f"{', '.join(AVMNIST_SPEAKERS)}")

    images, pca_stats = {}, {}
    for part in ("train", "test"):
      x = mnist[f"x_{part}"]
      if not cfg.clean:
        x, pca_stats[part] = pca_reconstruct(x, cfg.pca_variance)
        log.info("avmnist PCA (%s): %s", part, pca_stats[part])
        print(f"avmnist: PCA on MNIST {part}: k={pca_stats[part]['k']}, "
              f"explained variance kept {pca_stats[part]['explained_variance_kept']:.4f}, "
              f"energy removed {pca_stats[part]['energy_removed']:.4f}")
      images[part] = x
    if not cfg.clean:
      self.info.metadata.update({
          "pca": pca_stats, "snr_db": float(cfg.snr_db),
          "audio_samples": int(cfg.audio_samples),
          "noise_seed": int(cfg.noise_seed)})

    rec = {part: pair_recordings(mnist[f"y_{part}"], pools[part])
           for part in ("train", "test")}
    if cfg.clean:
      waves = power = None
    else:
      waves, power = fixed_length(audio, cfg.audio_samples)
    n_train = len(mnist["y_train"]) - VAL_SIZE
    sel = {
        "train": ("train", slice(0, n_train)),
        "val": ("train", slice(n_train, None)),
        "test": ("test", slice(None)),
    }
    return {
        split: self._generate_examples(
            split, images[part][s], mnist[f"y_{part}"][s], rec[part][s],
            audio, waves, power)
        for split, (part, s) in sel.items()
    }

  def _generate_examples(self, split, images, labels, rec, audio, waves,
                         power) -> Iterator[tuple[int, dict[str, Any]]]:
    cfg = self._config
    images = images[..., None]
    if cfg.clean:
      for i in range(len(labels)):
        yield i, {"image": images[i], "audio": audio[rec[i]],
                  "label": int(labels[i])}
      return
    code = _SPLIT_CODES[split]
    noise_std = (np.sqrt(power) * 10.0 ** (-float(cfg.snr_db) / 20.0))

    def batch(start: int) -> tuple[np.ndarray, np.ndarray]:
      idx = np.arange(start, min(start + _BATCH, len(labels)))
      r = rec[idx]
      noise = np.stack([
          np.random.default_rng((cfg.noise_seed, code, int(i)))
          .standard_normal(cfg.audio_samples, dtype=np.float32) for i in idx])
      noise *= noise_std[r, None].astype(np.float32)
      return idx, log_spectrogram(waves[r] + noise)

    # numpy/scipy release the GIL: compute batches in worker threads while
    # this thread hands examples to tfds (which serialises and writes them).
    # Each batch depends only on its indices, so the output is deterministic.
    starts = iter(range(0, len(labels), _BATCH))
    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
      pending = collections.deque(
          pool.submit(batch, s) for s in itertools.islice(starts, _THREADS + 1))
      while pending:
        idx, specs = pending.popleft().result()
        nxt = next(starts, None)
        if nxt is not None:
          pending.append(pool.submit(batch, nxt))
        for j, i in enumerate(idx):
          yield int(i), {"image": images[i], "audio": specs[j][..., None],
                         "label": int(labels[i])}
