"""An image as a grid of patches, each encoded by an image encoder of its own
choosing: one token per patch."""

from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp
from einops import rearrange

from mmjax.models.precision import Dtype
from mmjax.models.spec import from_spec


class PatchEncoder(nn.Module):
  """Image [B, H, W(, C)] -> tokens [B, (H/P) (W/P), D], one per P x P patch.

  Every patch goes through the same encoder `patch` (an `ENCODERS` spec,
  e.g. `{"name": "lenet"}`), whose tokens are mean-pooled to one vector per
  patch, in row-major patch order; `positions=True` adds a learned embedding
  per patch (normal, std `position_std`: 0.02 as ViT's, or the scale of the
  patch encoder's features, so that attention can tell the patches apart by
  place from the first step). This is the hybrid ViT's patch embedding
  with a convolutional network in place of the linear projection
  (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, section
  3.1, "Hybrid Architecture"), without its transformer: the model that reads
  the tokens (a fusion or a decoder) attends over them. With P the size of
  a layout's cells (28 for digits_qa's 2x2 grid of MNIST digits) each token
  encodes one cell.

  H and W must be multiples of `patch_size`. `dtype` and `param_dtype` are
  passed on to the patch encoder where its spec does not set them.
  """
  patch: Mapping
  patch_size: int
  positions: bool = True
  position_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    from mmjax.models.encoders import ENCODERS  # pylint: disable=g-import-not-at-top
    if image.ndim == 3:
      image = image[..., None]
    p = self.patch_size
    b, h, w, _ = image.shape
    if h % p or w % p:
      raise ValueError(f"PatchEncoder patch_size={p} does not divide the "
                       f"image's {h}x{w} pixels")
    encoder = from_spec("patch", self.patch, ENCODERS,
                        options=dict(dtype=self.dtype,
                                     param_dtype=self.param_dtype),
                        name="patch_encoder")
    patches = rearrange(image, "b (y p) (x q) c -> (b y x) p q c", p=p, q=p)
    tokens = jnp.mean(encoder(patches, train=train), axis=1)
    tokens = rearrange(tokens, "(b n) d -> b n d", b=b)  # [B, N, D]
    if not self.positions:
      return tokens
    embedding = self.param("position_embedding",
                           nn.initializers.normal(self.position_std),
                           tokens.shape[1:], self.param_dtype)
    return tokens + embedding.astype(tokens.dtype)
