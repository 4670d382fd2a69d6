"""Video as frames: a per-frame encoder, then temporal pooling or attention."""

from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp
from einops import rearrange

from mmjax.models.layers import NO_REMAT, TransformerBlock, remat
from mmjax.models.precision import Dtype
from mmjax.models.spec import from_spec


class FrameEncoder(nn.Module):
  """Video [B, T, H, W, C] -> tokens, one image encoder shared by all frames.

  Every frame goes through the same image encoder `frame` (an `ENCODERS`
  spec, e.g. `{"name": "lenet"}`), whose tokens are mean-pooled to one vector
  per frame, [B, T, D]. `temporal="mean"` averages the frames, [B, 1, D]
  (the late-pooling baseline of Karpathy et al., "Large-scale Video
  Classification with Convolutional Neural Networks", CVPR 2014);
  `temporal="transformer"` adds learned time embeddings and runs
  `temporal_layers` pre-LayerNorm transformer blocks over the frames, [B, T, D]
  (the factorised "late" temporal encoder of ViViT, Arnab et al., ICCV 2021).

  `dtype`, `param_dtype` and `remat` (a `mmjax.models.layers.REMAT_POLICIES`
  name) apply to the temporal blocks; they and `scan_layers` are passed on
  to the frame encoder where it declares them and its spec does not set
  them.
  """
  frame: Mapping
  temporal: str = "mean"
  temporal_layers: int = 1
  num_heads: int = 4
  max_frames: int = 64
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = NO_REMAT
  scan_layers: bool = False

  @nn.compact
  def __call__(self, video: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    from mmjax.models.encoders import ENCODERS  # pylint: disable=g-import-not-at-top
    if self.temporal not in ("mean", "transformer"):
      raise ValueError(f"FrameEncoder temporal={self.temporal!r}; known: "
                       "mean, transformer")
    if video.ndim == 4:
      video = video[..., None]
    b, t = video.shape[:2]
    if t > self.max_frames:
      raise ValueError(f"video has {t} frames, more than max_frames="
                       f"{self.max_frames}")
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    encoder = from_spec("frame", self.frame, ENCODERS,
                        options=dict(precision, remat=self.remat,
                                     scan_layers=self.scan_layers),
                        name="frame_encoder")
    frames = encoder(rearrange(video, "b t h w c -> (b t) h w c"),
                     train=train)
    frames = rearrange(jnp.mean(frames, axis=1), "(b t) d -> b t d",
                       b=b)  # [B, T, D]
    if self.temporal == "mean":
      return jnp.mean(frames, axis=1, keepdims=True)
    width = frames.shape[-1]
    time = self.param("time_embedding", nn.initializers.normal(0.02),
                      (self.max_frames, width), self.param_dtype)
    x = frames + time[:t].astype(frames.dtype)
    block = remat(TransformerBlock, self.remat)
    for i in range(self.temporal_layers):
      x = block(self.num_heads, 4 * width, name=f"temporal_{i}",
                **precision)(x, train=train)
    return nn.LayerNorm(epsilon=1e-6, name="norm", **precision)(x)
