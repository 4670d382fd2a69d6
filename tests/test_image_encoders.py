"""ResNet and ViT image encoders: parameter counts, shapes, state, gradients."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.encoders.resnet import ResNet, _Block
from mmjax.models.encoders.vit import ViT, decode_variant, posemb_sincos_2d


def count_params(params) -> int:
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def abstract_init(model, shape):
  """Variables of `model` for an input of `shape`, as shapes only."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape),
                                           train=False))


# XLA's CPU compile time dominates these tests; its backend optimisations
# (which leave the results unchanged) roughly double it.
jit = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def init(model, x):
  """Real variables of `model` for input `x`.

  The "unsafe_rbg" key compiles the initializers several times faster on CPU
  than the default threefry key, which keeps these tests quick.
  """
  return jit(model.init, static_argnames="train")(
      jax.random.key(0, impl="unsafe_rbg"), x, train=False)


def normal(*shape):
  return np.random.default_rng(0).normal(size=shape).astype(np.float32)


def all_finite(tree) -> bool:
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree))


# torchvision's totals minus the 1000-class fc layer (in * 1000 + 1000).
@pytest.mark.parametrize("depth,total,channels", [(18, 11_689_512, 512),
                                                  (34, 21_797_672, 512),
                                                  (50, 25_557_032, 2048)])
def test_resnet_parameter_count_and_shape_match_torchvision(depth, total,
                                                            channels):
  backbone = total - (channels * 1000 + 1000)
  assert backbone == {18: 11_176_512, 34: 21_284_672, 50: 23_508_032}[depth]
  out, variables = jax.eval_shape(
      lambda: ResNet(depth).init_with_output(
          jax.random.key(0), jnp.zeros((2, 224, 224, 3)), train=False))
  assert out.shape == (2, 49, channels)
  assert count_params(variables["params"]) == backbone
  # Running mean and variance: one pair per BatchNorm scale/bias pair.
  bn_params = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
      variables["params"]) if "bn" in jax.tree_util.keystr(path)]
  assert count_params(variables["batch_stats"]) == count_params(bn_params)


def test_resnet_unknown_depth_names_the_known_ones():
  with pytest.raises(ValueError, match=r"\[18, 34, 50\]"):
    abstract_init(ResNet(101), (1, 32, 32, 3))


def test_resnet_cifar_stem_keeps_small_images_and_accepts_grayscale():
  out = jax.eval_shape(
      lambda: ResNet(18, width=8, stem="cifar").init_with_output(
          jax.random.key(0), jnp.zeros((2, 28, 28)), train=False))[0]
  assert out.shape == (2, 16, 64)  # 28 -> 28, 14, 7, 4.


def test_resnet_passes_zero_init_residual_to_every_block():
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, _Block) and context.method_name == "__call__":
      seen.append(context.module.zero_init_residual)
    return next_fun(*args, **kwargs)

  for flag in (False, True):
    seen.clear()
    with nn.intercept_methods(record):
      abstract_init(ResNet(50, zero_init_residual=flag), (1, 32, 32, 3))
    assert seen == [flag] * 16


@pytest.mark.parametrize("kind,last", [("basic", "bn_1"),
                                       ("bottleneck", "bn_2")])
def test_resnet_block_with_zero_init_residual_is_its_shortcut(kind, last):
  block = _Block(kind, features=3, stride=2, zero_init_residual=True)
  x = normal(2, 8, 8, 4)
  variables = init(block, x)
  params = variables["params"]
  assert not np.any(params[last]["scale"])
  assert np.all(params["bn_0"]["scale"] == 1)
  kernels = {k: v["kernel"].shape for k, v in params.items() if "conv" in k}
  expansion = 1 if kind == "basic" else 4
  if kind == "bottleneck":  # v1.5: the stride sits on the 3x3 convolution.
    assert kernels == {"conv_0": (1, 1, 4, 3), "conv_1": (3, 3, 3, 3),
                       "conv_2": (1, 1, 3, 12),
                       "shortcut_conv": (1, 1, 4, 12)}
  out, state = jit(
      lambda v, x: block.apply(v, x, train=False, capture_intermediates=True,
                               mutable=["intermediates"]))(variables, x)
  assert out.shape == (2, 4, 4, 3 * expansion)
  shortcut = state["intermediates"]["shortcut_bn"]["__call__"][0]
  np.testing.assert_allclose(out, jax.nn.relu(shortcut), atol=1e-6)


def test_resnet_train_step_updates_batch_stats_and_gradients_are_finite():
  model = ResNet(18, width=8, stem="cifar")
  x = normal(2, 32, 32, 3)
  variables = init(model, x)

  @jit
  def step(variables, x):
    def loss(params, x):
      out, state = model.apply({"params": params,
                                "batch_stats": variables["batch_stats"]}, x,
                               train=True, mutable=["batch_stats"])
      return jnp.sum(out**2), (out, state)
    (value, (out, state)), grads = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
    eval_out = model.apply(variables, x, train=False)
    return value, out, state, grads, eval_out

  value, out, state, (grads, x_grad), eval_out = step(variables, x)
  assert out.shape == (2, 16, 64)
  assert np.isfinite(value)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)),
                         variables["batch_stats"], state["batch_stats"])
  assert all(jax.tree.leaves(changed))
  assert all_finite(grads)
  assert np.any(x_grad != 0)
  # The eval pass uses the running statistics: its output differs.
  assert eval_out.shape == out.shape
  assert not np.allclose(eval_out, out)


def test_vit_b16_parameter_count():
  # timm/google vit_base_patch16_224 has 86,567,656 parameters; without the
  # 1000-class head (768 * 1000 + 1000) that leaves 85,798,656. The learned
  # position embedding covers 197 = 196 + 1 positions (class token included).
  assert 86_567_656 - (768 * 1000 + 1000) == 85_798_656
  variables = abstract_init(ViT("B/16", pool="cls"), (1, 224, 224, 3))
  assert count_params(variables["params"]) == 85_798_656
  assert variables["params"]["pos_embedding"].shape == (1, 197, 768)


def test_vit_sincos2d_embedding_is_not_a_parameter():
  learned = abstract_init(ViT("S/32", pool="gap"), (1, 224, 224, 3))["params"]
  fixed = abstract_init(ViT("S/32", pool="gap", posemb="sincos2d"),
                        (1, 224, 224, 3))["params"]
  assert "pos_embedding" not in fixed
  assert count_params(learned) - count_params(fixed) == 49 * 384


def test_posemb_sincos_2d_values():
  pe = posemb_sincos_2d(3, 4, 16)
  assert pe.shape == (1, 12, 16)
  # Position (0, 0): sin = 0 and cos = 1 at every frequency.
  np.testing.assert_allclose(pe[0, 0], [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4)
  # Position (y=1, x=2) at the highest frequency (1): sin(2), cos(1).
  np.testing.assert_allclose(pe[0, 6, [0, 4, 8, 12]],
                             [np.sin(2), np.cos(2), np.sin(1), np.cos(1)],
                             rtol=1e-6)
  assert len({tuple(row) for row in pe[0].round(6)}) == 12


@pytest.mark.parametrize("variant,expected", [
    ("Ti/16", (192, 12, 768, 3, 16)), ("S/32", (384, 12, 1536, 6, 32)),
    ("M/16", (512, 12, 2048, 8, 16)), ("L/16", (1024, 24, 4096, 16, 16))])
def test_vit_decode_variant(variant, expected):
  cfg = decode_variant(variant)
  assert tuple(cfg[k] for k in ("width", "depth", "mlp_dim", "num_heads",
                                "patch_size")) == expected


@pytest.mark.parametrize("variant", ["X/16", "B", "B/", "B/x", "B/0"])
def test_vit_bad_variant_is_named(variant):
  with pytest.raises(ValueError, match=variant):
    decode_variant(variant)


def tiny_vit(**kwargs):
  return ViT(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=7,
             **kwargs)


@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
@pytest.mark.parametrize("pool,tokens", [("cls", 1), ("gap", 1), ("map", 1),
                                         ("none", 16)])
def test_vit_output_shapes(pool, tokens, posemb):
  out, variables = jax.eval_shape(
      lambda: tiny_vit(pool=pool, posemb=posemb).init_with_output(
          jax.random.key(0), jnp.zeros((3, 28, 28)), train=False))
  assert out.shape == (3, tokens, 16)
  assert ("cls" in variables["params"]) == (pool == "cls")
  assert ("map_head" in variables["params"]) == (pool == "map")


def test_vit_variant_output_shapes():
  x = jnp.zeros((2, 224, 224, 3))
  for pool, tokens in (("cls", 1), ("gap", 1), ("map", 1), ("none", 196)):
    model = ViT("Ti/16", pool=pool)
    out = jax.eval_shape(
        lambda model=model: model.init_with_output(jax.random.key(0), x,
                                                   train=False))[0]
    assert out.shape == (2, tokens, 192), pool


def test_vit_bad_pool_and_posemb_raise():
  for kwargs in ({"pool": "max"}, {"posemb": "sincos1d"}):
    with pytest.raises(ValueError, match=list(kwargs.values())[0]):
      abstract_init(tiny_vit(**kwargs), (1, 28, 28))


def test_tiny_vit_mnist_forward_backward_with_dropout():
  model = tiny_vit(pool="map", posemb="sincos2d", dropout=0.1)
  x = np.random.default_rng(0).uniform(size=(4, 28, 28, 1)).astype(np.float32)
  params = init(model, x)["params"]

  @jit
  def step(params, x):
    def loss(params, x):
      out = model.apply({"params": params}, x, train=True,
                        rngs={"dropout": jax.random.key(2, impl="unsafe_rbg")})
      return jnp.sum(out**2), out
    (value, train_out), grads = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(params, x)
    eval_out = model.apply({"params": params}, x, train=False)
    return value, train_out, grads, eval_out

  value, train_out, (grads, x_grad), eval_out = step(params, x)
  assert train_out.shape == eval_out.shape == (4, 1, 16)
  assert np.isfinite(value)
  assert all_finite(grads)
  # Every parameter receives a gradient, the image too.
  assert all(np.any(g != 0) for g in jax.tree.leaves(grads))
  assert np.any(x_grad != 0)
  # Dropout acts in training only.
  assert not np.allclose(eval_out, train_out)
