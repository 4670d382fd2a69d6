"""Encoders, fusions and the multimodal model: shapes, masks, gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mmjax.errors import UsageError
from mmjax.evaluators.classification import majority_vote
from mmjax.models.encoders import LeNet, LogMelSpectrogram
from mmjax.models.encoders.image import max_pool_2x2
from mmjax.models.factory import build_classifier
from mmjax.models.fusion import FUSIONS, ConcatFusion
from mmjax.models.layers import MLP
from mmjax.models.multimodal import MultimodalClassifier, drop_modalities

# Without the last pooling each LeNet gives a 3x3 grid: 9 tokens per modality.
ENCODERS = {"image": {"name": "lenet", "features": 4, "extra_layers": 3,
                      "final_pool": False},
            "audio": {"name": "lenet", "features": 4, "extra_layers": 4,
                      "final_pool": False}}


def make_batch(b=4, seed=0, audio_present=True):
  rng = np.random.default_rng(seed)
  return {
      "image": rng.integers(0, 255, (b, 28, 28, 1), dtype=np.uint8),
      "audio": rng.integers(0, 255, (b, 56, 56, 1), dtype=np.uint8),
      "mask/image": np.ones(b, bool),
      "mask/audio": np.full(b, audio_present),
      "label": rng.integers(0, 10, b).astype(np.int32),
  }


def make_model(fusion, **kwargs):
  fusion_kwargs = {"encoder": ENCODERS["audio"]} if fusion == "early" else None
  return build_classifier(modalities=("image", "audio"), encoders=ENCODERS,
                          fusion=fusion, num_classes=10,
                          fusion_kwargs=fusion_kwargs, **kwargs)


def test_lenet_recipe_shapes():
  image = LeNet(6, 3)
  out = image.apply(image.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)),
                               train=False), jnp.zeros((2, 28, 28, 1)),
                    train=False)
  assert out.shape == (2, 1, 48)
  audio = LeNet(6, 5)
  out = audio.apply(audio.init(jax.random.key(0), jnp.zeros((2, 112, 112)),
                               train=False), jnp.zeros((2, 112, 112)),
                    train=False)
  assert out.shape == (2, 1, 192)
  grid = LeNet(6, 3, final_pool=False)
  out = grid.apply(grid.init(jax.random.key(0), jnp.zeros((2, 28, 28)),
                             train=False), jnp.zeros((2, 28, 28)), train=False)
  assert out.shape == (2, 9, 48)


def test_lenet_he_uniform_init_is_multibenchs():
  # kaiming_uniform_: U(-b, b), b = sqrt(6 / fan_in), fan_in = 3 * 3 * 6.
  variables = LeNet(6, 3, kernel_init="he_uniform").init(
      jax.random.key(0), jnp.zeros((1, 28, 28)), train=False)
  kernel = np.asarray(variables["params"]["conv_1"]["kernel"])
  bound = np.sqrt(6 / 54)
  assert np.abs(kernel).max() <= bound
  assert kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.1)
  with pytest.raises(ValueError, match="kernel_init 'torch'"):
    LeNet(kernel_init="torch").init(jax.random.key(0), jnp.zeros((1, 28, 28)),
                                    train=False)


@pytest.mark.parametrize("shape", [(2, 28, 28, 6), (2, 7, 7, 3), (1, 3, 6, 2)])
def test_max_pool_2x2_matches_reduce_window(shape):
  # Values and gradients of flax's reduce_window pooling, odd sides floored.
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  reference = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(max_pool_2x2(x), reference(x))
  square_sum = lambda pool: jax.grad(lambda x: (pool(x) ** 2).sum())(x)
  np.testing.assert_array_equal(square_sum(max_pool_2x2), square_sum(reference))


# The fusion contract runs over every fusion (test_fusion_contract.py); here
# the whole classifier passes masks and gradients for one fusion of each kind
# (token-level, input-level, logit-level) and a unimodal baseline.
@pytest.mark.parametrize("fusion", ["concat", "early", "late", "image_only"])
def test_the_classifier_masks_and_passes_gradients(fusion):
  """Logits [B, K]; a masked modality's content is ignored; gradients reach
  every modality's input of a multimodal fusion."""
  model = make_model(fusion)
  batch = make_batch()
  variables = model.init(jax.random.key(0), batch, train=False)
  apply = jax.jit(lambda b: model.apply(variables, b, train=False))
  assert apply(batch).shape == (4, 10)
  no_audio = dict(batch, **{"mask/audio": np.array([True, False] * 2)})
  other = dict(no_audio, audio=make_batch(seed=1)["audio"])
  changed = np.asarray(apply(other) != apply(no_audio)).any(-1)
  uses_audio = fusion != "image_only"
  np.testing.assert_array_equal(changed, [uses_audio, False] * 2)
  if fusion.endswith("_only"):
    return

  def loss(inputs):
    b = dict(batch, image=inputs[0], audio=inputs[1])
    return jnp.sum(model.apply(variables, b, train=False) ** 2)

  grads = jax.jit(jax.grad(loss))((batch["image"].astype(np.float32),
                                   batch["audio"].astype(np.float32)))
  assert all(float(jnp.abs(g).sum()) > 0 for g in grads)


def test_unimodal_builds_only_its_encoder():
  variables = make_model("image_only").init(jax.random.key(0), make_batch(),
                                            train=False)
  assert "encoder_image" in variables["params"]
  assert "encoder_audio" not in variables["params"]


def test_late_fusion_renormalises_over_present_modalities():
  model = make_model("late")
  batch = make_batch()
  variables = model.init(jax.random.key(0), batch, train=False)
  both, extra = model.apply(variables, batch, train=False,
                            mutable=["intermediates"])
  per_modality = extra["intermediates"]["fusion"]["modality_logits"][0]
  np.testing.assert_allclose(both, per_modality.mean(1), atol=1e-6)
  # Sorted order: audio first, image second.
  image_only = model.apply(variables, dict(batch, **{"mask/audio": np.zeros(
      4, bool)}), train=False)
  np.testing.assert_allclose(image_only, per_modality[:, 1], atol=1e-6)


def test_weighted_fusion_weights_renormalise():
  fusion = FUSIONS["weighted"](dim=3)
  features = {"a": jnp.ones((2, 5)), "b": 2 * jnp.ones((2, 5))}
  tokens = {m: x[:, None] for m, x in features.items()}
  masks = {"a": jnp.array([True, True]), "b": jnp.array([True, False])}
  variables = fusion.init(jax.random.key(0), tokens, masks)
  out = fusion.apply(variables, tokens, masks)
  proj_a = features["a"] @ variables["params"]["proj_a"]["kernel"] + \
      variables["params"]["proj_a"]["bias"]
  proj_b = features["b"] @ variables["params"]["proj_b"]["kernel"] + \
      variables["params"]["proj_b"]["bias"]
  np.testing.assert_allclose(out[0], (proj_a[0] + proj_b[0]) / 2, atol=1e-6)
  np.testing.assert_allclose(out[1], proj_a[1], atol=1e-6)


def test_majority_vote():
  logits = np.zeros((3, 3, 4))
  logits[0, :, 2] = 1  # all vote 2
  logits[1, 0, 1] = logits[1, 1, 1] = logits[1, 2, 3] = 1  # 1 wins 2:1
  logits[2, 0, 1] = logits[2, 1, 3] = 1  # tie 1 vs 3; third absent
  present = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0]], bool)
  fused = np.array([[0, 0, 0, 0], [0, 0, 0, 9], [0, 0, 0, 5.0]])
  np.testing.assert_array_equal(majority_vote(logits, present, fused),
                                [2, 1, 3])


def test_drop_modalities_rates_and_never_drops_everything():
  masks = {"image": jnp.ones(20000, bool), "audio": jnp.ones(20000, bool)}
  dropped = drop_modalities(jax.random.key(0), masks,
                            {"image": 0.5, "audio": 0.5})
  both_gone = ~dropped["image"] & ~dropped["audio"]
  assert not bool(both_gone.any())
  # Of the 25% drawn to lose both, all keep both: image present 0.5 + 0.25.
  assert abs(float(dropped["image"].mean()) - 0.75) < 0.02
  only = drop_modalities(jax.random.key(1), masks, {"audio": 0.3})
  assert bool(only["image"].all())
  assert abs(float(only["audio"].mean()) - 0.7) < 0.02
  absent = dict(masks, audio=jnp.zeros(20000, bool))
  assert bool(drop_modalities(jax.random.key(2), absent,
                              {"image": 0.9})["image"].all())


def test_modality_dropout_acts_only_in_training():
  model = MultimodalClassifier(
      modalities=("image", "audio"),
      encoders={"image": LeNet(4, 3, final_pool=False),
                "audio": LeNet(4, 4, final_pool=False)},
      fusion=ConcatFusion(), head=MLP((100, 10)), num_classes=10,
      modality_dropout={"audio": 0.99})
  batch = make_batch()
  variables = model.init(jax.random.key(0), batch, train=False)
  other = dict(batch, audio=make_batch(seed=1)["audio"])
  apply = lambda b, train: model.apply(
      variables, b, train=train, rngs={"dropout": jax.random.key(3)},
      mutable=["batch_stats"])[0]
  assert not np.allclose(apply(batch, False), apply(other, False))
  # Audio dropped for (almost surely) every example: its content is ignored.
  np.testing.assert_allclose(apply(batch, True), apply(other, True),
                             atol=1e-6)


@pytest.mark.parametrize("fusion, token_shape", [("concat", (64,)),
                                                 ("early", (1,))])
def test_missing_token_replaces_a_masked_modality(fusion, token_shape):
  model = make_model(fusion).clone(missing="token")
  batch = make_batch(audio_present=False)
  variables = model.init(jax.random.key(0), batch, train=False)
  assert variables["params"]["mask_token_audio"].shape == token_shape
  logits = model.apply(variables, batch, train=False)
  other = dict(batch, audio=make_batch(seed=1)["audio"])
  np.testing.assert_allclose(model.apply(variables, other, train=False),
                             logits, atol=1e-6)
  moved = jax.tree.map(lambda x: x, variables)
  moved["params"]["mask_token_audio"] = moved["params"]["mask_token_audio"] + 1
  assert not np.allclose(model.apply(moved, batch, train=False), logits)


class Gain(nn.Module):
  """A front end with one parameter, so that its name shows in the tree."""

  @nn.compact
  def __call__(self, x):
    return x * self.param("gain", nn.initializers.ones, ())


def lenet_tree(prefix, features, layers):
  """The parameter and batch-stat paths and shapes of a `LeNet` (1 channel)."""
  tree = {}
  for i in range(layers + 1):
    width, before = features * 2**i, features * 2**(i - 1) if i else 1
    size = 5 if i == 0 else 3
    tree[f"params/{prefix}/conv_{i}/kernel"] = (size, size, before, width)
    for kind, names in (("params", ("bias", "scale")),
                        ("batch_stats", ("mean", "var"))):
      for name in names:
        tree[f"{kind}/{prefix}/bn_{i}/{name}"] = (width,)
  return tree


def shapes(model, batch):
  variables = jax.eval_shape(lambda b: model.init(jax.random.key(0), b,
                                                  train=False), batch)
  return {"/".join(path): x.shape for path, x in
          traverse_util.flatten_dict(variables).items()}


def test_avmnist_concat_parameter_tree_is_unchanged():
  """The names checkpoints hold: encoder_<m>, frontend_<m>, head,
  mask_token_<m>, unimodal_head_<m> (here with the AV-MNIST LeNets)."""
  model = MultimodalClassifier(
      modalities=("image", "audio"),
      encoders={"image": LeNet(6, 3), "audio": LeNet(6, 5)},
      frontends={"audio": Gain()}, fusion=ConcatFusion(),
      head=MLP((100, 10)), num_classes=10, missing="token",
      unimodal_heads="probe")
  batch = dict(make_batch(), audio=np.zeros((4, 112, 112), np.float32))
  expected = {**lenet_tree("encoder_image", 6, 3),
              **lenet_tree("encoder_audio", 6, 5),
              "params/frontend_audio/gain": (),
              "params/head/dense_0/kernel": (240, 100),
              "params/head/dense_0/bias": (100,),
              "params/head/dense_1/kernel": (100, 10),
              "params/head/dense_1/bias": (10,),
              "params/mask_token_image": (48,),
              "params/mask_token_audio": (192,),
              "params/unimodal_head_image/kernel": (48, 10),
              "params/unimodal_head_image/bias": (10,),
              "params/unimodal_head_audio/kernel": (192, 10),
              "params/unimodal_head_audio/bias": (10,)}
  assert shapes(model, batch) == expected
  # The config factory builds the same tree (log-mel has no parameters).
  logmel = {"name": "logmel", "sample_rate": 8000, "n_fft": 256,
            "hop_length": 64, "n_mels": 64}
  built = build_classifier(
      modalities=("image", "audio"),
      encoders={"image": {"name": "lenet", "features": 6, "extra_layers": 3},
                "audio": {"name": "lenet", "features": 6, "extra_layers": 5,
                          "frontend": logmel}},
      fusion="concat", num_classes=10, missing="token",
      unimodal_heads="probe")
  wave = dict(make_batch(), audio=np.zeros((4, 8000), np.float32))
  del expected["params/frontend_audio/gain"]
  assert shapes(built, wave) == expected
  assert isinstance(built.frontends["audio"], LogMelSpectrogram)


def test_sown_intermediates_split_a_linear_concat_head_by_modality():
  """`fused`, `features/<m>` and `present/<m>` are sown; they leave outputs
  alone, and W_m f_m + b / M over sorted modalities sum to the logits."""
  model = make_model("concat", head_hidden=())
  batch = make_batch(audio_present=False)
  variables = model.init(jax.random.key(0), batch, train=False)
  logits, state = model.apply(variables, batch, train=False,
                              mutable=["intermediates"])
  np.testing.assert_array_equal(logits,
                                model.apply(variables, batch, train=False))
  sown = {k: v[0] for k, v in state["intermediates"].items()}
  assert sorted(sown) == ["features/audio", "features/image", "fused",
                          "present/audio", "present/image"]
  assert sown["features/image"].shape == (4, 32)
  np.testing.assert_array_equal(sown["present/audio"], np.zeros(4, bool))
  np.testing.assert_array_equal(sown["features/audio"], 0)
  dense = variables["params"]["head"]["dense_0"]
  parts, start = [], 0
  for m in ("audio", "image"):
    width = sown[f"features/{m}"].shape[-1]
    np.testing.assert_array_equal(sown["fused"][:, start:start + width],
                                  sown[f"features/{m}"])
    parts.append(sown[f"features/{m}"] @ dense["kernel"][start:start + width]
                 + dense["bias"] / 2)
    start += width
  np.testing.assert_allclose(sum(parts), logits, atol=1e-5)


def test_late_and_early_fusion_sow_what_they_have():
  batch = make_batch()
  late = make_model("late")
  _, state = late.apply(late.init(jax.random.key(0), batch, train=False),
                        batch, train=False, mutable=["intermediates"])
  assert "fused" not in state["intermediates"]
  assert "features/audio" in state["intermediates"]
  early = make_model("early")
  _, state = early.apply(early.init(jax.random.key(0), batch, train=False),
                         batch, train=False, mutable=["intermediates"])
  assert sorted(state["intermediates"]) == ["fused"]


def test_factory_takes_import_strings_and_names_unknown_names():
  model = build_classifier(
      modalities=("image", "audio"),
      encoders={m: dict(spec, name="mmjax.models.encoders.image:LeNet")
                for m, spec in ENCODERS.items()},
      fusion="mmjax.models.fusion.basic:ConcatFusion", num_classes=10)
  assert isinstance(model.fusion, ConcatFusion)
  assert isinstance(model.encoders["audio"], LeNet)
  with pytest.raises(UsageError, match="unknown model.fusion 'nope'"):
    build_classifier(modalities=("image",), encoders=ENCODERS, fusion="nope",
                     num_classes=10)
  with pytest.raises(UsageError, match="unknown model.encoders.audio.name"):
    build_classifier(modalities=("image", "audio"),
                     encoders=dict(ENCODERS, audio={"name": "nope"}),
                     fusion="concat", num_classes=10)
