"""Audio transformer, video and patch encoders: shapes, gradients, pooling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.encoders.audio import AudioSpectrogramTransformer
from mmjax.models.encoders.image import LeNet
from mmjax.models.encoders.patches import PatchEncoder
from mmjax.models.encoders.video import FrameEncoder


def init_apply(module, x, **kwargs):
  variables = module.init(jax.random.key(0), x, train=False)
  return variables, module.apply(variables, x, train=False, **kwargs)


def test_ast_overlapping_patches_and_pooling():
  spectrogram = jax.random.normal(jax.random.key(1), (2, 64, 48))
  ast = AudioSpectrogramTransformer(width=16, depth=1, num_heads=2, mlp_dim=32)
  variables, pooled = init_apply(ast, spectrogram)
  assert pooled.shape == (2, 1, 16)
  # Stride 10 with 16x16 patches: (64-16)//10+1 = 5 by (48-16)//10+1 = 4.
  assert variables["params"]["position_embedding"].shape == (1, 22, 16)
  tokens = ast.clone(pool="none").apply(variables, spectrogram, train=False)
  assert tokens.shape == (2, 20, 16)

  def loss(x):
    return jnp.sum(ast.apply(variables, x, train=False) ** 2)
  grad = jax.grad(loss)(spectrogram)
  assert float(jnp.abs(grad).sum()) > 0


def test_ast_rejects_a_too_short_input():
  with pytest.raises(ValueError, match="at least 16"):
    init_apply(AudioSpectrogramTransformer(width=8, depth=1, num_heads=2,
                                           mlp_dim=8), jnp.zeros((1, 8, 64)))


@pytest.mark.parametrize("temporal,tokens", [("mean", 1), ("transformer", 3)])
def test_frame_encoder_shares_one_image_encoder(temporal, tokens):
  video = jax.random.uniform(jax.random.key(2), (2, 3, 16, 16, 1))
  encoder = FrameEncoder(frame={"name": "lenet", "features": 4,
                                "extra_layers": 1},
                         temporal=temporal, num_heads=2)
  variables, out = init_apply(encoder, video)
  assert out.shape == (2, tokens, 8)
  assert list(variables["params"]).count("frame_encoder") == 1
  # Frame order matters only to the temporal transformer.
  reversed_out = encoder.apply(variables, video[:, ::-1], train=False)
  assert np.allclose(reversed_out.mean(1), out.mean(1), atol=1e-5) == (
      temporal == "mean")


def test_frame_encoder_refuses_too_many_frames():
  with pytest.raises(ValueError, match="max_frames"):
    init_apply(FrameEncoder(frame={"name": "lenet", "features": 2,
                                   "extra_layers": 0}, max_frames=2),
               jnp.zeros((1, 3, 8, 8)))


def test_patch_encoder_encodes_each_patch_alone_in_row_major_order():
  image = jax.random.uniform(jax.random.key(3), (2, 16, 24))
  lenet = {"name": "lenet", "features": 4, "extra_layers": 1}
  encoder = PatchEncoder(patch=lenet, patch_size=8)
  variables, tokens = init_apply(encoder, image)
  assert tokens.shape == (2, 6, 8)  # 2 x 3 patches of 8 x 8
  # Token (y, x) is the LeNet of patch (y, x) plus that patch's embedding.
  inner = {"params": variables["params"]["patch_encoder"],
           "batch_stats": variables["batch_stats"]["patch_encoder"]}
  patch = image[:, 8:16, 16:24]  # row 1, column 2: token 5
  alone = LeNet(features=4, extra_layers=1).apply(inner, patch,
                                                  train=False).mean(1)
  np.testing.assert_allclose(
      tokens[:, 5], alone + variables["params"]["position_embedding"][5],
      rtol=1e-5, atol=1e-6)
  plain = encoder.clone(positions=False)
  assert "position_embedding" not in plain.init(
      jax.random.key(0), image, train=False)["params"]
  with pytest.raises(ValueError, match="does not divide the image's 16x24"):
    init_apply(PatchEncoder(patch=lenet, patch_size=16), image)
