"""Contrastive towers, prompt text, pretrained init and the LiT lock."""

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mmjax import configs, experiment, parallel
from mmjax.data import pipeline
from mmjax.errors import UsageError
from mmjax.models.contrastive import ContrastiveModel
from mmjax.models.encoders import BagOfEmbeddings, LeNet
from mmjax.models.factory import build_contrastive

TEXT = {"name": "bag_of_embeddings", "vocab_size": 50, "dim": 8}
IMAGE = {"name": "lenet", "features": 2, "extra_layers": 1}


def batch(b=3, captions=0, seed=0):
  rng = np.random.default_rng(seed)
  shape = (b, captions, 6) if captions else (b, 6)
  out = {"image": rng.integers(0, 255, (b, 8, 8, 1), dtype=np.uint8),
         "text": rng.integers(1, 50, shape).astype(np.int32)}
  if captions:
    out["valid/text"] = np.ones((b, captions), bool)
  return out


def test_towers_normalise_and_embed_several_items_per_example():
  model = build_contrastive(modalities=("image", "text"),
                            encoders={"image": IMAGE, "text": TEXT},
                            embed_dim=4, objective="sigmoid")
  variables = model.init(jax.random.key(0), batch(), train=False)
  out = model.apply(variables, batch(), train=False)
  assert out["embedding/image"].shape == out["embedding/text"].shape == (3, 4)
  np.testing.assert_allclose(jnp.linalg.norm(out["embedding/text"], axis=-1),
                             1.0, rtol=1e-5)
  np.testing.assert_allclose([out["log_scale"], out["bias"]],
                             [np.log(10.0), -10.0], rtol=1e-6)
  multi = batch(captions=5)
  out = model.apply(variables, multi, train=False)
  assert out["embedding/text"].shape == (3, 5, 4)
  # Caption 2 of example 1 embeds as it would alone.
  single = model.apply(variables, {"text": multi["text"][1:2, 2]}, train=False)
  np.testing.assert_allclose(out["embedding/text"][1, 2],
                             single["embedding/text"][0], atol=1e-6)
  assert "embedding/image" not in single


def test_locked_tower_passes_no_gradient_to_its_encoder():
  model = ContrastiveModel(modalities=("image", "text"),
                           encoders={"image": LeNet(2, 1),
                                     "text": BagOfEmbeddings(50, 8)},
                           embed_dim=4, locked=("text",))
  variables = model.init(jax.random.key(0), batch(), train=False)

  def loss(params):
    out = model.apply({**variables, "params": params}, batch(), train=False)
    return jnp.sum(out["embedding/image"] * out["embedding/text"])

  grads = jax.grad(loss)(variables["params"])
  assert all(float(jnp.abs(g).sum()) == 0
             for g in jax.tree.leaves(grads["tower_text"]["encoder"]))
  assert float(jnp.abs(grads["tower_text"]["projection"]["kernel"]).sum()) > 0


class Gain(nn.Module):
  """A front end with one parameter, so that its name shows in the tree."""

  @nn.compact
  def __call__(self, x):
    return x * self.param("gain", nn.initializers.ones, ())


def test_tower_parameter_tree_is_unchanged():
  """The names checkpoints hold: tower_<m>/{frontend,encoder,projection},
  log_scale and bias."""
  model = ContrastiveModel(modalities=("image", "text"),
                           encoders={"image": LeNet(2, 1),
                                     "text": BagOfEmbeddings(50, 8)},
                           frontends={"image": Gain()}, embed_dim=4)
  variables = jax.eval_shape(lambda b: model.init(jax.random.key(0), b,
                                                  train=False), batch())
  tree = {"/".join(path): x.shape for path, x in
          traverse_util.flatten_dict(variables).items()}
  image = "tower_image/encoder"
  assert tree == {
      "params/log_scale": (), "params/bias": (),
      "params/tower_image/frontend/gain": (),
      f"params/{image}/conv_0/kernel": (5, 5, 1, 2),
      f"params/{image}/bn_0/scale": (2,), f"params/{image}/bn_0/bias": (2,),
      f"batch_stats/{image}/bn_0/mean": (2,),
      f"batch_stats/{image}/bn_0/var": (2,),
      f"params/{image}/conv_1/kernel": (3, 3, 2, 4),
      f"params/{image}/bn_1/scale": (4,), f"params/{image}/bn_1/bias": (4,),
      f"batch_stats/{image}/bn_1/mean": (4,),
      f"batch_stats/{image}/bn_1/var": (4,),
      "params/tower_image/projection/kernel": (4, 4),
      "params/tower_image/projection/bias": (4,),
      "params/tower_text/encoder/embeddings/embedding": (50, 8),
      "params/tower_text/projection/kernel": (8, 4),
      "params/tower_text/projection/bias": (4,)}
  built = build_contrastive(modalities=("image", "text"),
                            encoders={"image": IMAGE, "text": TEXT},
                            embed_dim=4)
  built_tree = jax.eval_shape(lambda b: built.init(jax.random.key(0), b,
                                                   train=False), batch())
  assert {"/".join(path) for path in traverse_util.flatten_dict(
      built_tree)} == set(tree) - {"params/tower_image/frontend/gain"}


def test_prompt_text_is_seeded_and_names_the_class():
  made = []

  def tokenizer(texts):
    made.extend(texts)
    return np.array([[len(made)]], np.int32), np.ones((1, 1), bool)

  records = [{"label": i % 3} for i in range(6)]
  prompts = pipeline.PromptText(tokenizer, ("zero", "one", "two"),
                                ("a {}", "the {}!"))
  ds = grain.MapDataset.source(records).seed(7).random_map(prompts)
  first = [ds[i]["text"] for i in range(6)]
  texts = list(made)
  for i in range(6):  # a second pass draws the same templates
    ds[i]  # pylint: disable=pointless-statement
  assert made[6:] == texts
  for i, text in enumerate(texts):
    assert text in (f"a {('zero', 'one', 'two')[i % 3]}",
                    f"the {('zero', 'one', 'two')[i % 3]}!")
  assert len(set(texts)) > 3
  assert all(x.shape == (1,) for x in first)


def test_load_pretrained_overwrites_a_subtree_and_checks_shapes(monkeypatch):
  config = configs.load_config("configs/av_contrastive.py:smoke")
  with config.unlocked():
    config.model.encoders = {"image": IMAGE, "audio": IMAGE}
  mesh = parallel.make_mesh(8)
  model = experiment.build_model(config)
  spec = {k: jax.ShapeDtypeStruct((8,) + v.shape[1:], v.dtype)
          for k, v in batch(8).items() if k == "image"}
  spec["audio"] = spec["image"]
  state, _ = experiment.create_train_state(
      config, model, experiment.build_optimizer(config)[0], spec, mesh)
  target = state.params["tower_audio"]["encoder"]
  fake = jax.tree.map(lambda x: np.full(x.shape, 0.5, np.float32), target)
  monkeypatch.setattr(experiment.pretrained, "load_minilm", lambda: ({}, fake))
  loaded = experiment.load_pretrained(state, {"tower_audio/encoder": "minilm"})
  for new, old in zip(jax.tree.leaves(loaded.params["tower_audio"]["encoder"]),
                      jax.tree.leaves(target)):
    np.testing.assert_array_equal(new, 0.5)
    assert new.sharding == old.sharding
  np.testing.assert_array_equal(
      loaded.params["tower_image"]["projection"]["kernel"],
      state.params["tower_image"]["projection"]["kernel"])
  with pytest.raises(UsageError, match="does not fit"):
    experiment.load_pretrained(state, {"tower_image/projection": "minilm"})
  with pytest.raises(UsageError, match="unknown model.init"):
    experiment.load_pretrained(state, {"tower_image/encoder": "bert-huge"})


def fake_tokenizer(texts):
  ids = np.array([[len(t), t.count(" ") + 1] for t in texts], np.int32)
  return ids, np.ones_like(ids, bool)


def test_caption_transforms_draw_one_or_take_all():
  record = {"captions": np.array([b"a dog", b"two cats sit", b"x"], object)}
  train_ds = grain.MapDataset.source([record] * 40).seed(3).random_map(
      pipeline.CaptionText(fake_tokenizer))
  drawn = {tuple(train_ds[i]["text"]) for i in range(40)}
  assert drawn == {(5, 2), (12, 3), (1, 1)}
  every = pipeline.AllCaptions(fake_tokenizer, num_captions=4).map(record)
  np.testing.assert_array_equal(every["text"],
                                [[5, 2], [12, 3], [1, 1], [0, 0]])
  np.testing.assert_array_equal(every["valid/text"], [1, 1, 1, 0])
  example = pipeline.Preprocess(("text",)).map(every)
  assert example["valid/text"].shape == (4,) and "label" not in example
