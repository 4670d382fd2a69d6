"""The JAX audio front end matches librosa on real FSDD clips."""

import numpy as np
import pytest
import soundfile as sf

from mmjax.data.builders import DEFAULT_SOURCE_DIR
from mmjax.models.encoders import LogMelSpectrogram

librosa = pytest.importorskip("librosa", reason="librosa is a test extra")

CLIPS = ["0_jackson_0", "3_theo_12", "7_nicolas_33", "9_yweweler_45",
         "5_george_4", "1_lucas_20"]


def clip(name):
  waveform, rate = sf.read(DEFAULT_SOURCE_DIR / "fsdd" / "recordings" /
                           f"{name}.flac", dtype="float32")
  assert rate == 8000
  return waveform[:4000]


@pytest.fixture(scope="module")
def waveforms():
  clips = [clip(n) for n in CLIPS]
  length = min(len(c) for c in clips)
  return np.stack([c[:length] for c in clips])


# n_fft 511: FFT bin frequencies from rfftfreq (a linspace grid is 0.58 dB off).
@pytest.mark.parametrize("n_fft, hop, n_mels", [(256, 64, 64), (512, 128, 40),
                                               (511, 128, 40)])
def test_log_mel_matches_librosa(waveforms, n_fft, hop, n_mels):
  frontend = LogMelSpectrogram(sample_rate=8000, n_fft=n_fft, hop_length=hop,
                               n_mels=n_mels, top_db=80.0)
  ours = np.asarray(frontend.apply({}, waveforms))
  for i, w in enumerate(waveforms):
    mel = librosa.feature.melspectrogram(
        y=w, sr=8000, n_fft=n_fft, hop_length=hop, n_mels=n_mels,
        center=True, pad_mode="constant", power=2.0)
    expected = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=80.0)
    assert ours[i].shape == expected.shape
    # dB values: 1e-4 relative to the spectrogram's dynamic range.
    np.testing.assert_allclose(ours[i], expected, atol=1e-4 * 80, rtol=0)
    mel_ours = 10 ** (ours[i] / 10)
    np.testing.assert_allclose(mel_ours[expected > expected.max() - 60],
                               mel[expected > expected.max() - 60], rtol=1e-4)


def test_mfcc_matches_librosa(waveforms):
  frontend = LogMelSpectrogram(sample_rate=8000, n_fft=256, hop_length=64,
                               n_mels=40, top_db=80.0, n_mfcc=13)
  ours = np.asarray(frontend.apply({}, waveforms))
  for i, w in enumerate(waveforms):
    expected = librosa.feature.mfcc(
        y=w, sr=8000, n_mfcc=13, n_fft=256, hop_length=64, n_mels=40,
        center=True, pad_mode="constant")  # power_to_db top_db=80 default
    np.testing.assert_allclose(ours[i], expected, atol=1e-4 * np.abs(
        expected).max(), rtol=0)


def test_int16_input_is_scaled():
  frontend = LogMelSpectrogram()
  x = (np.random.default_rng(0).standard_normal((1, 2000)) * 3000).astype(
      np.int16)
  np.testing.assert_allclose(frontend.apply({}, x),
                             frontend.apply({}, x.astype(np.float32) / 32768),
                             atol=1e-4)
