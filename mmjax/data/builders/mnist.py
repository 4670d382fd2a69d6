"""MNIST from the repo's compact copy (`data/mnist/mnist.npz`)."""

from __future__ import annotations

import tensorflow_datasets as tfds

from mmjax.data.builders import _common


class Mnist(_common.LocalBuilder, skip_registration=True):
  """MNIST handwritten digits (LeCun, Cortes, Burges), local copy.

  Splits: train (60,000), test (10,000), in the original MNIST order (record i
  of a split is image i of that split in mnist.npz).
  Features: image uint8 [28, 28, 1]; label ClassLabel(10), int64.
  Source: <source_dir>/mnist/mnist.npz (see data/mnist/PROVENANCE.md).
  """

  name = "mnist"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Local copy of MNIST, array_record."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self._make_info(
        description="MNIST handwritten digits, 28x28 grayscale.",
        features=tfds.features.FeaturesDict({
            "image": _common.uint8_image((28, 28, 1), "MNIST image, 0..255"),
            "label": _common.label_feature(),
        }),
        supervised_keys=("image", "label"),
        homepage="http://yann.lecun.com/exdb/mnist/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # no downloads: everything is local
    arrays = _common.load_mnist(self)
    return {
        "train": self._generate_examples(arrays["x_train"], arrays["y_train"]),
        "test": self._generate_examples(arrays["x_test"], arrays["y_test"]),
    }

  def _generate_examples(self, images, labels):
    images = images[..., None]
    for i in range(len(images)):
      yield i, {"image": images[i], "label": int(labels[i])}
