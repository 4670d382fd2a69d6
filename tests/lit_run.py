"""The LiT smoke run the checkpoint tests share (test_clip, test_siglip):
a few steps of a `configs/lit.py` config through the ordinary trainer, and
the check that the locked image tower kept the checkpoint's weights while
every text parameter moved."""

import jax
import numpy as np

RETRIEVAL_R1 = "eval/coco_mini/retrieval/text_to_image/R@1"


def train_lit(config, tmp_path) -> dict:
  """Trains `config` for 6 steps on coco_mini built under tmp_path; returns
  the final parameters (host arrays) after checking its retrieval metric."""
  from mmjax import train  # pylint: disable=import-outside-toplevel
  config.total_steps = 6
  config.eval_batch_size = 40  # over the 8 test devices
  config.data_dir = str(tmp_path / "tfds")
  state, metrics = train.train(config, str(tmp_path / "run"))
  assert 0 <= metrics[RETRIEVAL_R1] <= 1
  return jax.device_get(state.params)


def assert_image_locked_text_moved(params: dict, loaded: dict):
  """tower_image equals the checkpoint's; every tower_text leaf differs."""
  jax.tree.map(np.testing.assert_array_equal, params["tower_image"],
               loaded["tower_image"])
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                       params["tower_text"], loaded["tower_text"])
  assert all(jax.tree.leaves(moved))
