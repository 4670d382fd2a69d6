"""MBT bottleneck fusion: shapes, masks, gradients, early/late, parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.fusion.bottleneck import BottleneckFusion

SHAPES = {"audio": (5, 12), "image": (3, 8), "text": (4, 6)}
# One layer per modality alone, then two exchanging through the bottleneck
# (the last layer's bottleneck average reaches no CLS token, so two are needed
# for the average to matter).
SMALL = dict(dim=16, num_layers=3, fusion_layer=1, num_bottlenecks=2,
             num_heads=2)


def make_inputs(b=3, seed=0, names=("audio", "image")):
  rng = np.random.default_rng(seed)
  tokens = {m: jnp.asarray(rng.normal(size=(b, *SHAPES[m])), jnp.float32)
            for m in names}
  masks = {m: jnp.ones(b, bool) for m in names}
  return tokens, masks


def random_params(module, tokens, masks, seed=0):
  """Random parameters of `module` for these inputs, without compiling init.

  LayerNorm scales are 1 + 0.3 N(0, 1), everything else 0.3 N(0, 1); only
  the shapes come from `module.init` (traced abstractly by jax.eval_shape).
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), tokens, masks)

  def draw(path, leaf):
    noise = 0.3 * rng.normal(size=leaf.shape).astype(np.float32)
    return noise + (path[-1].key == "scale")

  return {"params": jax.tree_util.tree_map_with_path(draw, shapes["params"])}


def num_params(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def fusion():
  module = BottleneckFusion(**SMALL)
  tokens, masks = make_inputs()
  return jax.jit(module.apply), random_params(module, tokens, masks)


def test_output_shape(fusion):
  apply, variables = fusion
  tokens, masks = make_inputs()
  assert apply(variables, tokens, masks).shape == (3, 16)
  default = BottleneckFusion()
  shapes = jax.eval_shape(default.init, jax.random.key(0), tokens, masks)
  assert jax.eval_shape(default.apply, shapes, tokens, masks).shape == (3, 64)


def test_gradients_reach_every_modality(fusion):
  apply, variables = fusion
  tokens, masks = make_inputs()
  grads = jax.jit(jax.grad(
      lambda t: jnp.sum(apply(variables, t, masks) ** 2)))(tokens)
  for m, g in grads.items():
    assert float(jnp.abs(g).sum()) > 0, m


def test_masked_modality_is_ignored(fusion):
  apply, variables = fusion
  tokens, masks = make_inputs()
  masks = dict(masks, image=jnp.array([False, True, False]))
  out = apply(variables, tokens, masks)
  other = dict(tokens, image=make_inputs(seed=1)[0]["image"] * 100.0)
  changed = apply(variables, other, masks)
  np.testing.assert_array_equal(changed[::2], out[::2])
  assert not np.allclose(changed[1], out[1])  # example 1 sees the image


def test_all_masked_is_finite(fusion):
  apply, variables = fusion
  tokens, _ = make_inputs()
  masks = {m: jnp.zeros(3, bool) for m in tokens}
  out = apply(variables, tokens, masks)
  assert np.all(np.isfinite(out))
  other = {m: t * 100.0 + 1.0 for m, t in tokens.items()}
  np.testing.assert_array_equal(apply(variables, other, masks), out)


def test_three_modalities_with_one_masked_equal_the_other_two(fusion):
  """A masked third modality is left out of the bottleneck and output means."""
  apply, _ = fusion
  module = BottleneckFusion(**SMALL)
  tokens, masks = make_inputs(names=("audio", "image", "text"))
  masks = dict(masks, text=jnp.array([False, True, False]))
  variables = random_params(module, tokens, masks, seed=1)
  out = jax.jit(module.apply)(variables, tokens, masks)
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
  variables = random_params(module, tokens, masks)

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
