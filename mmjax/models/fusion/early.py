"""Early fusion: low-level inputs joined into one network."""

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.encoders import ENCODERS
from mmjax.models.layers import NO_REMAT, pool_tokens
from mmjax.models.precision import Dtype
from mmjax.models.spec import from_spec


class EarlyFusion(nn.Module):
  """Early fusion: the modalities' inputs stacked as channels of one image.

  Each modality's low-level input ([B, H_m, W_m] or [B, H_m, W_m, C_m], e.g. a
  28x28 digit and a 112x112 spectrogram) is bilinearly resized to the largest
  height and width among them, zeroed where the modality is masked, and the
  results are concatenated along channels (sorted modality order) into one
  [B, H, W, sum_m C_m] input for a single encoder (`encoder`, e.g. LeNet), whose
  mean-pooled output tokens [B, D] are the fused representation. This is the
  "early" end of the early-to-late spectrum (Baltrusaitis et al., TPAMI 2019).

  Attributes:
    encoder: the encoder module, or its `ENCODERS` spec
      `{"name": <ENCODERS key or import string>, **kwargs}`; named "encoder"
      in the parameter tree either way.
    dtype: the dtype the inputs are resized and stacked in (the compute
      dtype); with `param_dtype`, `remat` and `scan_layers` passed on to an
      encoder built from a spec where its class declares them and the spec
      does not set them.
  """
  encoder: Mapping | nn.Module
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = NO_REMAT
  scan_layers: bool = False
  takes_inputs = True

  @nn.compact
  def __call__(self, inputs, masks, *, train: bool = False):
    names = sorted(inputs)
    images = [x if x.ndim == 4 else x[..., None] for x in
              (inputs[m].astype(self.dtype) for m in names)]
    height = max(x.shape[1] for x in images)
    width = max(x.shape[2] for x in images)
    stacked = []
    for name, x in zip(names, images):
      if x.shape[1:3] != (height, width):
        x = jax.image.resize(x, (x.shape[0], height, width, x.shape[3]),
                             "bilinear")
      stacked.append(jnp.where(masks[name][:, None, None, None], x, 0))
    if isinstance(self.encoder, nn.Module):
      net = self.encoder  # attached by its field name: "encoder"
    else:
      net = from_spec("model.fusion_kwargs.encoder", self.encoder, ENCODERS,
                      options=dict(dtype=self.dtype,
                                   param_dtype=self.param_dtype,
                                   remat=self.remat,
                                   scan_layers=self.scan_layers),
                      name="encoder")
    return pool_tokens(net(jnp.concatenate(stacked, -1), train=train))
