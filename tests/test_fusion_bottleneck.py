"""MBT bottleneck fusion: masked third modality, early/late, parameters.

The contract every fusion keeps (shapes, gradients, masks) is in
test_fusion_contract.py; these are the bottleneck's own checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.fusion.bottleneck import BottleneckFusion

import test_fusion_contract as contract

SHAPES = {"audio": (5, 12), "image": (3, 8), "text": (4, 6)}
# One layer per modality alone, then two exchanging through the bottleneck
# (the last layer's bottleneck average reaches no CLS token, so two are needed
# for the average to matter).
SMALL = dict(dim=16, num_layers=3, fusion_layer=1, num_bottlenecks=2,
             num_heads=2)


def make_inputs(b=3, seed=0, names=("audio", "image")):
  tokens = contract.make_tokens({m: SHAPES[m] for m in names}, b, seed)
  masks = {m: jnp.ones(b, bool) for m in names}
  return tokens, masks


def num_params(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def test_default_output_width():
  tokens, masks = make_inputs()
  default = BottleneckFusion()
  shapes = jax.eval_shape(default.init, jax.random.key(0), tokens, masks)
  assert jax.eval_shape(default.apply, shapes, tokens, masks).shape == (3, 64)


def test_three_modalities_with_one_masked_equal_the_other_two():
  """A masked third modality is left out of the bottleneck and output means."""
  module = BottleneckFusion(**SMALL)
  apply = jax.jit(module.apply)
  tokens, masks = make_inputs(names=("audio", "image", "text"))
  masks = dict(masks, text=jnp.array([False, True, False]))
  variables = contract.random_params(module, tokens, masks, seed=1)
  out = apply(variables, tokens, masks)
  assert out.shape == (3, 16)
  assert "block_2_text" in variables["params"]
  params = {k: v for k, v in variables["params"].items() if "text" not in k}
  pair = {m: tokens[m] for m in ("audio", "image")}
  expected = apply({"params": params}, pair, {m: masks[m] for m in pair})
  np.testing.assert_allclose(out[::2], expected[::2], atol=1e-6)
  assert not np.allclose(out[1], expected[1], atol=1e-4)


def audio_cls_when_image_changes(fusion_layer):
  """Audio's sown CLS [B, dim] and the output, for two image token sets."""
  module = BottleneckFusion(**dict(SMALL, fusion_layer=fusion_layer))
  tokens, masks = make_inputs()
  other = dict(tokens, image=make_inputs(seed=1)[0]["image"])
  variables = contract.random_params(module, tokens, masks)

  @jax.jit
  def run(t):
    out, state = module.apply(variables, t, masks, mutable="intermediates")
    return state["intermediates"]["cls"][0][:, 0], out  # audio is first

  return run(tokens), run(other)


def test_late_fusion_keeps_modalities_apart():
  (audio, out), (audio_other, out_other) = audio_cls_when_image_changes(3)
  np.testing.assert_array_equal(audio, audio_other)
  assert not np.allclose(out, out_other)  # the image's own CLS did change


def test_early_fusion_mixes_modalities():
  # With fusion_layer=0 the image reaches the bottleneck average after layer
  # 0 and the audio tokens through it from layer 1 on.
  (audio, _), (audio_other, _) = audio_cls_when_image_changes(0)
  assert not np.allclose(audio, audio_other, atol=1e-4)


def expected_param_count(dim, num_layers, fusion_layer, num_bottlenecks,
                         num_heads, shapes):
  del num_heads
  mlp = 4 * dim
  block = 4 * dim + 4 * (dim * dim + dim) + 2 * dim * mlp + mlp + dim
  embed = sum(d * dim + dim + dim + (n + 1) * dim for n, d in shapes)
  bottleneck = num_bottlenecks * dim if fusion_layer < num_layers else 0
  return embed + num_layers * len(shapes) * block + bottleneck + 2 * dim


@pytest.mark.parametrize("names", [("audio", "image"),
                                   ("audio", "image", "text")])
@pytest.mark.parametrize("num_layers,fusion_layer", [(2, 1), (2, 2), (3, 0)])
def test_param_count(names, num_layers, fusion_layer):
  config = dict(SMALL, num_layers=num_layers, fusion_layer=fusion_layer)
  tokens, masks = make_inputs(names=names)
  shapes = jax.eval_shape(BottleneckFusion(**config).init, jax.random.key(0),
                          tokens, masks)
  assert num_params(shapes) == expected_param_count(
      **config, shapes=[SHAPES[m] for m in names])
  assert ("bottleneck" in shapes["params"]) == (fusion_layer < num_layers)
  assert shapes["params"]["position_audio"].shape == (6, 16)


def test_bad_fusion_layer_raises():
  tokens, masks = make_inputs()
  with pytest.raises(ValueError, match="fusion_layer"):
    jax.eval_shape(BottleneckFusion(num_layers=2, fusion_layer=3).init,
                   jax.random.key(0), tokens, masks)


def test_dropout_uses_the_dropout_rng_when_training():
  module = BottleneckFusion(**SMALL, dropout=0.5)
  tokens, masks = make_inputs()
  variables = jax.eval_shape(module.init, jax.random.key(0), tokens, masks)
  out = jax.eval_shape(lambda v: module.apply(
      v, tokens, masks, train=True, rngs={"dropout": jax.random.key(1)}),
                       variables)
  assert out.shape == (3, 16)
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda v: module.apply(v, tokens, masks, train=True),
                   variables)
