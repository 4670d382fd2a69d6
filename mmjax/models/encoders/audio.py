"""The audio front end, computed in JAX: waveform -> STFT -> mel -> log.

The formulas follow librosa's conventions (McFee et al., "librosa: Audio and
Music Signal Analysis in Python", SciPy 2015): `melspectrogram` with a periodic
Hann window, centred frames, power 2 and Slaney-normalised mel filters on the
Slaney mel scale; `power_to_db` with ref=1, amin=1e-10 and `top_db` clipping.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import scipy.fft
import scipy.signal
from einops import rearrange

from mmjax.models.layers import NO_REMAT, TransformerBlock, remat, scan_blocks
from mmjax.models.precision import Dtype


def hz_to_mel(freqs):
  """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
  freqs = np.asarray(freqs, dtype=np.float64)
  f_sp = 200.0 / 3
  mels = freqs / f_sp
  min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
  return np.where(freqs >= min_log_hz,
                  min_log_mel + np.log(np.maximum(freqs, 1e-10) / min_log_hz)
                  / logstep, mels)


def mel_to_hz(mels):
  """Inverse of `hz_to_mel`."""
  mels = np.asarray(mels, dtype=np.float64)
  f_sp = 200.0 / 3
  min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
  return np.where(mels >= min_log_mel,
                  min_log_hz * np.exp(logstep * (mels - min_log_mel)),
                  f_sp * mels)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float,
                   fmax: float) -> np.ndarray:
  """Slaney-normalised triangular filters, [n_mels, n_fft // 2 + 1].

  librosa's `filters.mel(htk=False, norm="slaney")`, written out because
  librosa (numba, llvmlite) is a test dependency only; tests compare the two.
  The FFT bin frequencies are `rfftfreq`'s, exact for odd `n_fft` too.
  """
  fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
  mel_points = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax),
                                     n_mels + 2))
  widths = np.diff(mel_points)
  ramps = mel_points[:, None] - fft_freqs[None, :]
  lower = -ramps[:-2] / widths[:-1, None]
  upper = ramps[2:] / widths[1:, None]
  weights = np.maximum(0, np.minimum(lower, upper))
  weights *= (2.0 / (mel_points[2:n_mels + 2] - mel_points[:n_mels]))[:, None]
  return weights.astype(np.float32)


def dct_matrix(n_mfcc: int, n_mels: int) -> np.ndarray:
  """Orthonormal DCT-II as a matrix, [n_mfcc, n_mels]: scipy's
  `dct(type=2, norm="ortho")` of the identity."""
  return scipy.fft.dct(np.eye(n_mels), type=2, norm="ortho",
                       axis=0)[:n_mfcc].astype(np.float32)


class LogMelSpectrogram(nn.Module):
  """Waveform [B, T] -> log-mel spectrogram [B, n_mels, frames] in dB.

  With `n_mfcc > 0` returns MFCCs [B, n_mfcc, frames] instead (DCT-II of the
  log-mel spectrogram, librosa's `mfcc`). Integer input is read as 16-bit PCM
  and scaled to [-1, 1). Frames = 1 + T // hop_length with `center=True`.
  The STFT, mel filters and logarithm are computed in float32 whatever the
  input's dtype; the output is cast to `dtype` (the model's compute dtype).
  """
  sample_rate: int = 8000
  n_fft: int = 256
  hop_length: int = 64
  n_mels: int = 64
  fmin: float = 0.0
  fmax: float | None = None
  center: bool = True
  top_db: float | None = 80.0
  n_mfcc: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, waveform: jnp.ndarray) -> jnp.ndarray:
    if jnp.issubdtype(waveform.dtype, jnp.integer):
      waveform = waveform.astype(jnp.float32) / 32768.0
    elif waveform.dtype != jnp.float32:  # the FFT in float32 (no bfloat16 FFT)
      waveform = waveform.astype(jnp.float32)
    if self.center:
      pad = self.n_fft // 2
      waveform = jnp.pad(waveform, ((0, 0), (pad, pad)))
    num_frames = 1 + (waveform.shape[-1] - self.n_fft) // self.hop_length
    index = (np.arange(num_frames)[:, None] * self.hop_length
             + np.arange(self.n_fft)[None, :])
    window = scipy.signal.get_window("hann", self.n_fft)  # periodic
    frames = waveform[:, index] * window.astype(np.float32)  # [B, frames, n_fft]
    power = jnp.abs(jnp.fft.rfft(frames, axis=-1)) ** 2
    filters = mel_filterbank(self.sample_rate, self.n_fft, self.n_mels,
                             self.fmin, self.fmax or self.sample_rate / 2)
    mel = jnp.einsum("bfk,mk->bmf", power, filters)
    log_mel = 10.0 * jnp.log10(jnp.maximum(mel, 1e-10))
    if self.top_db is not None:
      log_mel = jnp.maximum(
          log_mel, jnp.max(log_mel, axis=(1, 2), keepdims=True) - self.top_db)
    if self.n_mfcc:
      log_mel = jnp.einsum("cm,bmf->bcf", dct_matrix(self.n_mfcc, self.n_mels),
                           log_mel)
    return log_mel.astype(self.dtype)


AUDIO_FRONTENDS = {"logmel": LogMelSpectrogram}


class AudioSpectrogramTransformer(nn.Module):
  """AST: a transformer over overlapping spectrogram patches.

  Gong, Chung, Glass, "AST: Audio Spectrogram Transformer", Interspeech 2021.
  A spectrogram [B, F, T] (or [B, F, T, 1]) is cut into `patch` x `patch`
  patches with strides `strides` (the paper: 16x16 with stride 10 in both
  axes, so patches overlap by 6), each linearly embedded (one strided
  convolution), plus learned position embeddings and two learned tokens in
  front, [CLS] and the distillation token of DeiT; pre-LayerNorm transformer
  blocks and a final LayerNorm follow. The paper's representation is the mean
  of the two leading tokens' outputs: `pool="cls"` returns it, [B, 1, D];
  `pool="none"` returns the patch tokens [B, N, D]. Input is normalised by
  `(x - mean) / (2 * std)` with the dataset statistics `norm_mean`,
  `norm_std`, as the paper does (defaults: no normalisation), in float32.

  Computes in `dtype` (LayerNorm statistics and attention softmax in
  float32), parameters in `param_dtype`; `remat` (a
  `mmjax.models.layers.REMAT_POLICIES` name) rematerialises each block;
  `scan_layers` runs the blocks with `nn.scan` (parameters "blocks/..."
  stacked [depth, ...] instead of "block_<i>"; off by default).
  """
  width: int = 192
  depth: int = 4
  num_heads: int = 3
  mlp_dim: int = 768
  patch: int = 16
  strides: tuple[int, int] = (10, 10)
  pool: str = "cls"
  dropout: float = 0.0
  norm_mean: float = 0.0
  norm_std: float = 0.5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = NO_REMAT
  scan_layers: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    if self.pool not in ("cls", "none"):
      raise ValueError(f"AST pool={self.pool!r}; known: cls, none")
    if x.ndim == 3:
      x = x[..., None]
    x = (x.astype(jnp.promote_types(x.dtype, jnp.float32)) - self.norm_mean
         ) / (2 * self.norm_std)
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.strides,
                padding="VALID", name="patch_embedding", **precision)(x)
    b, h, w, d = x.shape
    if h == 0 or w == 0:
      raise ValueError(f"AST needs at least {self.patch} bins and frames")
    x = rearrange(x, "b f t d -> b (f t) d")  # patches frequency-major
    leading = self.param("leading_tokens", nn.initializers.normal(0.02),
                         (1, 2, d), self.param_dtype).astype(x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(leading, (b, 2, d)), x], 1)
    x = x + self.param("position_embedding", nn.initializers.normal(0.02),
                       (1, h * w + 2, d), self.param_dtype).astype(x.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    block = functools.partial(remat(TransformerBlock, self.remat),
                              self.num_heads, self.mlp_dim, self.dropout,
                              **precision)
    if self.scan_layers:
      x = scan_blocks(block(name="blocks"), x, self.depth, train=train)
    else:
      for i in range(self.depth):
        x = block(name=f"block_{i}")(x, train=train)
    x = nn.LayerNorm(epsilon=1e-6, name="norm", **precision)(x)
    if self.pool == "cls":
      return jnp.mean(x[:, :2], axis=1, keepdims=True)
    return x[:, 2:]
