"""Retrieval, zero-shot and linear-probe evaluators on hand-made embeddings.

Most embeddings are 2-D unit vectors given by their angle in degrees, so the
cosine ranking is the ranking by angular distance and every expected recall
or accuracy below is worked out by hand in the comments.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import parallel
from mmjax.evaluators.linear_probe import fit_ridge, linear_probe
from mmjax.evaluators.retrieval import retrieval
from mmjax.evaluators.zero_shot import class_embeddings_from_prompts, zero_shot


class Batches:
  """Re-iterable batches, like `pipeline.EvalBatches`."""

  def __init__(self, batches):
    self._batches = batches

  def __iter__(self):
    return iter(self._batches)


def unit(degrees) -> np.ndarray:
  """Angles [...] in degrees -> unit vectors [..., 2]."""
  r = np.deg2rad(np.asarray(degrees, np.float64))
  return np.stack([np.cos(r), np.sin(r)], -1).astype(np.float32)


def split(arrays: dict, size: int) -> Batches:
  """A dict of [N, ...] arrays -> batches of `size` rows, as jnp arrays."""
  n = len(next(iter(arrays.values())))
  return Batches([{k: jnp.asarray(v[i:i + size]) for k, v in arrays.items()}
                  for i in range(0, n, size)])


def embeddings_of(**keys):
  """predict_fn returning {"embedding/<m>": batch[key]} for m=key pairs."""
  return lambda b: {f"embedding/{m}": b[k] for m, k in keys.items()}


# --------------------------------------------------------------- retrieval --


def test_retrieval_one_item_per_example_with_sharded_padding():
  # Images at 0, 60, ..., 300 degrees; example i's text at texts[i]. Rows 6
  # and 7 are padding that would change every recall if counted.
  images = [0, 60, 120, 180, 240, 300, 120, 0]
  texts = [0, 100, 200, 290, 240, 120, 300, 60]
  batch = {"image": unit(images), "text": unit(texts),
           "valid": np.arange(8) < 6}
  mesh = parallel.make_mesh()
  batch = parallel.put_batch(batch, parallel.batch_sharding(mesh))
  predict = embeddings_of(image="image", text="text")

  results = dict(retrieval(predict, Batches([batch]), ks=(1, 3, 5)))
  # Text -> image: number of images closer than the text's own image:
  # t0 0; t1 (100) img2 at 20 < 40 -> 1; t2 (200) img3, img4 -> 2;
  # t3 (290) img5, img4, img0 -> 3; t4 0; t5 (120) own at 180 -> 5.
  # Image -> text: img0 0; img1 (own at 40) 0; img2 (own 80) t5, t1 -> 2;
  # img3 (own 110) t2, t4, t5, t1 -> 4; img4 0; img5 (own 180) -> 5.
  assert results == {
      "text_to_image/R@1": 2 / 6, "text_to_image/R@3": 4 / 6,
      "text_to_image/R@5": 5 / 6,
      "image_to_text/R@1": 3 / 6, "image_to_text/R@3": 4 / 6,
      "image_to_text/R@5": 5 / 6,
  }
  default = dict(retrieval(predict, Batches([batch])))
  assert sorted(default) == sorted(
      f"{d}/R@{k}" for d in ("text_to_image", "image_to_text")
      for k in (1, 5, 10))
  assert default["text_to_image/R@1"] == 2 / 6
  assert default["image_to_text/R@10"] == 1.0


def test_retrieval_ties_count_against_the_query():
  # Collapsed embeddings: every similarity ties, so nothing is retrieved.
  batch = {"x": np.ones((4, 2), np.float32) / np.sqrt(2),
           "valid": np.ones(4, bool)}
  results = dict(retrieval(embeddings_of(image="x", text="x"),
                           split(batch, 4), ks=(1, 3, 4)))
  assert results["text_to_image/R@1"] == 0.0
  assert results["text_to_image/R@3"] == 0.0
  assert results["image_to_text/R@4"] == 1.0


def _multi_caption_batches():
  # Images at 0, 120, 240; two captions each, the last one invalid (it sits
  # exactly on image 2 and would be its best match if counted). Example 3 is
  # padding with captions on its image.
  return split({
      "image": unit([0, 120, 240, 240]),
      "text": unit([[10, 200], [250, 70], [340, 240], [240, 240]]),
      "valid/text": np.array([[1, 1], [1, 1], [1, 0], [1, 1]], bool),
      "valid": np.array([1, 1, 1, 0], bool)}, 2)


def test_retrieval_several_captions_per_image():
  batches = _multi_caption_batches()
  predict = embeddings_of(image="image", text="text")
  results = dict(retrieval(predict, batches, ks=(1, 2, 3)))
  # Text -> image, per valid caption, images closer than its own:
  # 10 -> 0; 200 (own 0 at 160) img2, img1 -> 2; 250 (own 120 at 130)
  # img2, img0 -> 2; 70 -> 0; 340 (own 240 at 100) img0 -> 1.
  # Image -> text, per image, captions of other images closer than its
  # nearest own caption: img0 (10 at 10) 0; img1 (70 at 50; its first
  # caption 250 alone would rank 2) 0; img2 (340 at 100) 200, 250 -> 2.
  expected = {
      "text_to_image/R@1": 2 / 5, "text_to_image/R@2": 3 / 5,
      "text_to_image/R@3": 1.0,
      "image_to_text/R@1": 2 / 3, "image_to_text/R@2": 2 / 3,
      "image_to_text/R@3": 1.0,
  }
  assert results == expected
  # The multi-item side may be the query or the target.
  swapped = dict(retrieval(predict, batches, query="image", target="text",
                           ks=(1, 2, 3)))
  assert swapped == expected


# --------------------------------------------------------------- zero-shot --


def test_zero_shot_with_given_class_embeddings():
  # Classes at 0 (length 10: only the cosine counts), 120 and 240 degrees.
  classes = unit([0, 120, 240]) * np.array([[10.0], [1.0], [1.0]])
  # (angle, label): 10 -> 0 right; 65 -> 1 right (by cosine; a dot product
  # with the long class 0 would say 0); 200 -> 2 right; 290 -> 2 wrong;
  # 130 -> 1 wrong. Rows 5-7 are padding that would be right.
  batches = split({
      "emb": unit([10, 65, 200, 290, 130, 0, 0, 0]),
      "label": np.array([0, 1, 2, 0, 2, 0, 0, 0]),
      "valid": np.arange(8) < 5}, 4)
  results = dict(zero_shot(embeddings_of(image="emb"), batches,
                           modality="image", class_embeddings=classes))
  assert results == {"accuracy": 3 / 5}


def test_zero_shot_with_image_prototypes():
  # Class prototypes from the images: 0 and 20 -> 10; 100 and 140 -> 120;
  # 240. Audio (label): 60 (0) right; 70 (0) -> 1 wrong; 170 (1) right;
  # 190 (1) -> 2 wrong; 300 (2) right. The padding row (image 90, label 0)
  # would move prototype 0 to about 35 degrees and make 70 right.
  batches = split({
      "image": unit([0, 20, 100, 140, 240, 90]),
      "audio": unit([60, 70, 170, 190, 300, 10]),
      "label": np.array([0, 0, 1, 1, 2, 0]),
      "valid": np.arange(6) < 5}, 3)
  predict = embeddings_of(image="image", audio="audio")
  results = dict(zero_shot(predict, batches, modality="audio",
                           prototypes_from="image"))
  assert results == {"accuracy": 3 / 5}


def test_zero_shot_needs_exactly_one_class_source():
  batches = split({"emb": unit([0]), "label": np.zeros(1, int),
                   "valid": np.ones(1, bool)}, 1)
  predict = embeddings_of(image="emb")
  with pytest.raises(ValueError):
    dict(zero_shot(predict, batches, modality="image"))
  with pytest.raises(ValueError):
    dict(zero_shot(predict, batches, modality="image",
                   class_embeddings=unit([0]), prototypes_from="image"))


def test_class_embeddings_from_prompts_ensembles_templates():
  calls = []

  def embed(strings):
    # Unnormalised: [#"cat", #"dog", "photo" in s].
    calls.append(list(strings))
    return np.array([[s.count("cat"), s.count("dog"), "photo" in s]
                     for s in strings], np.float32)

  emb = class_embeddings_from_prompts(embed, ["cat", "dog"],
                                      ["a photo of a {}.", "a {}."])
  assert calls == [["a photo of a cat.", "a cat.", "a photo of a dog.",
                    "a dog."]]
  # Mean of the unit vectors (1, 0, 1)/sqrt(2) and (1, 0, 0), renormalised:
  # the bisector, at 22.5 degrees from the class axis.
  c, s = np.cos(np.pi / 8), np.sin(np.pi / 8)
  np.testing.assert_allclose(emb, [[c, 0, s], [0, c, s]], atol=1e-6)


# ------------------------------------------------------------ linear probe --


def _clusters(rng, per_class, centers, noise=0.3):
  labels = np.repeat(np.arange(len(centers)), per_class)
  x = centers[labels] + noise * rng.normal(size=(len(labels), centers.shape[1]))
  return x.astype(np.float32), labels


def _with_padding(x, labels, pad_x, pad_labels):
  return {"emb": np.concatenate([x, pad_x]),
          "label": np.concatenate([labels, pad_labels]),
          "valid": np.arange(len(x) + len(pad_x)) < len(x)}


def test_linear_probe_separable_data_ignores_padding():
  rng = np.random.default_rng(0)
  centers = 3.0 * np.eye(4)[:3]
  train_x, train_y = _clusters(rng, 10, centers)
  test_x, test_y = _clusters(rng, 10, centers)
  # Padding: 30 points of class 0 labelled 1 in training (they would
  # outvote its 10 real ones), and class 0 points labelled 2 in the test
  # split; either would cost accuracy.
  pad_train = _with_padding(train_x, train_y, np.repeat(centers[:1], 30, 0),
                            np.ones(30, int))
  pad_test = _with_padding(test_x, test_y, centers[[0, 0]], np.full(2, 2))
  predict = embeddings_of(image="emb")
  results = dict(linear_probe(predict, split(pad_test, 8), modality="image",
                              train_batches=split(pad_train, 8)))
  assert results == {"accuracy": 1.0}
  # The same training padding counted as real data costs class 0 (a third
  # of the test split).
  pad_train["valid"][:] = True
  counted = dict(linear_probe(predict, split(pad_test, 8), modality="image",
                              train_batches=split(pad_train, 8)))
  assert counted["accuracy"] == 2 / 3


def test_linear_probe_random_labels_is_at_chance():
  rng = np.random.default_rng(1)
  train = {"emb": rng.normal(size=(200, 8)).astype(np.float32),
           "label": rng.integers(0, 4, 200), "valid": np.ones(200, bool)}
  test = {"emb": rng.normal(size=(1000, 8)).astype(np.float32),
          "label": rng.integers(0, 4, 1000), "valid": np.ones(1000, bool)}
  results = dict(linear_probe(embeddings_of(image="emb"), split(test, 500),
                              modality="image",
                              train_batches=split(train, 100)))
  assert abs(results["accuracy"] - 0.25) < 0.06


def test_fit_ridge_closed_form():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(20, 3))
  labels = np.array([0] * 12 + [1] * 5 + [2] * 3)
  # Without a penalty: ordinary least squares with a bias column.
  design = np.concatenate([x, np.ones((20, 1))], 1)
  ols = np.linalg.lstsq(design, np.eye(3)[labels], rcond=None)[0]
  np.testing.assert_allclose(fit_ridge(x, labels, 3, 0.0), ols, atol=1e-10)
  # A huge penalty leaves only the (unpenalised) bias: the class frequencies.
  w = fit_ridge(x, labels, 3, 1e9)
  np.testing.assert_allclose(w[:3], 0.0, atol=1e-8)
  np.testing.assert_allclose(w[3], [12 / 20, 5 / 20, 3 / 20], atol=1e-8)
  with pytest.raises(ValueError):
    fit_ridge(x, labels, 2, 1e-3)
