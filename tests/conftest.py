"""Test setup: 8 simulated CPU devices, so sharding is tested everywhere, and
one small AV-MNIST build shared by the tests that train on it."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The measured CPU peak and the compilation cache of every run the tests
# start (in-process or as subprocesses), kept out of the user's cache.
os.environ.setdefault("MMJAX_CACHE_DIR",
                      tempfile.mkdtemp(prefix="mmjax-test-cache-"))

import numpy as np  # noqa: E402  (after the XLA flags)
import pytest  # noqa: E402

from mmjax.data import builders  # noqa: E402

AVMNIST_TRAIN_IMAGES, AVMNIST_TEST_IMAGES = 10_000, 1_000


@pytest.fixture(scope="session")
def subset_source(tmp_path_factory):
  """Makes a source dir like data/ with the first n_train MNIST train and
  n_test test images and (a link to) the whole FSDD; returns its path."""
  def make(n_train: int, n_test: int):
    root = tmp_path_factory.mktemp("source")
    (root / "mnist").mkdir()
    with np.load(builders.DEFAULT_SOURCE_DIR / "mnist" / "mnist.npz") as z:
      np.savez(root / "mnist" / "mnist.npz",
               x_train=z["x_train"][:n_train], y_train=z["y_train"][:n_train],
               x_test=z["x_test"][:n_test], y_test=z["y_test"][:n_test])
    (root / "fsdd").symlink_to(builders.DEFAULT_SOURCE_DIR / "fsdd")
    return root
  return make


@pytest.fixture(scope="session")
def avmnist_data_dir(tmp_path_factory, subset_source) -> str:
  """A tfds data_dir with `avmnist` and `avmnist/clean` built by the real
  builders from the first 10,000 MNIST train and 1,000 test images and the
  whole FSDD: splits train 5,000 / val 5,000 / test 1,000 (val is always the
  last 5,000 train images). The full builds are tested in test_builders."""
  source = subset_source(AVMNIST_TRAIN_IMAGES, AVMNIST_TEST_IMAGES)
  data_dir = tmp_path_factory.mktemp("tfds")
  for name in ("avmnist", "avmnist/clean"):
    builders.get_builder(name, str(data_dir), source_dir=str(source))
  return str(data_dir)


@pytest.fixture
def frozen_lm_flamingo(tmp_path):
  """Trains `configs/coco_mini_captioning.py:model=flamingo,<lm>=DIR,smoke`
  for 6 steps (past the smoke warm-up of 5) and checks that the pretrained
  decoder stayed frozen while every tanh gate of the `num_layers` gated
  blocks, initialised at 0, moved. Call as (config argument "gpt2=DIR" or
  "llama=DIR", the decoder's loaded parameters, num_layers); returns the
  run's config."""
  # pylint: disable-next=import-outside-toplevel
  import jax
  from mmjax import configs, train  # pylint: disable=import-outside-toplevel

  def run(argument: str, decoder_params, num_layers: int):
    config = configs.load_config(
        f"configs/coco_mini_captioning.py:model=flamingo,{argument},smoke")
    config.total_steps = 6
    config.generation.max_new_tokens = 4
    config.eval_splits = ("test[:8]",)
    config.eval_batch_size = 8  # over the 8 test devices
    config.data_dir = str(tmp_path / "tfds")
    state, metrics = train.train(config, str(tmp_path / "run"))
    assert 0 <= metrics["eval/coco_mini_test[:8]/captioning/CIDEr-D"]
    params = jax.device_get(state.params)
    jax.tree.map(np.testing.assert_array_equal, params["decoder"],
                 decoder_params)
    gates = [params[f"gated_xattn_{i}"][f"alpha_{g}"]
             for i in range(num_layers) for g in ("xattn", "dense")]
    assert all(g != 0 for g in gates), gates
    return config
  return run
