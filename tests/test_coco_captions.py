"""configs/coco_captions.py offline: tfds's coco_captions through mock_data.

The metadata written here (features.json, dataset_info.json) has the feature
structure of tfds's `coco_captions/2014` 1.1.0 (tensorflow_datasets/
object_detection/coco.py and coco_captions.py) and the Karpathy split sizes;
`tfds.testing.mock_data` then serves random examples of that structure
(variable-size JPEG images, 5 captions each) in place of the prepared files.
"""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_info, file_adapters
from tensorflow_datasets.core import splits as splits_lib

from mmjax import configs, experiment, parallel, train
from mmjax.data import pipeline
from mmjax.errors import UsageError

CONFIG = "configs/coco_captions.py:smoke"
KARPATHY_SPLITS = {"train": 82783, "val": 5000, "test": 5000, "restval": 30504}


@pytest.fixture(scope="module")
def metadata_dir(tmp_path_factory):
  """A data_dir with coco_captions/2014/1.1.0's metadata and no records."""
  root = tmp_path_factory.mktemp("coco_captions_metadata")
  directory = root / "coco_captions" / "2014" / "1.1.0"
  directory.mkdir(parents=True)
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(encoding_format="jpeg"),
      "image/filename": tfds.features.Text(),
      "image/id": np.int64,
      "objects": tfds.features.Sequence({
          "id": np.int64, "area": np.int64,
          "bbox": tfds.features.BBoxFeature(),
          "label": tfds.features.ClassLabel(num_classes=80),
          "is_crowd": np.bool_}),
      "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
  })
  identity = dataset_info.DatasetIdentity(
      name="coco_captions", version="1.1.0", config_name="2014",
      data_dir=str(directory),
      module_name="tensorflow_datasets.object_detection.coco_captions")
  splits = splits_lib.SplitDict([
      splits_lib.SplitInfo(name=name, shard_lengths=[n], num_bytes=0,
                           filename_template=None)
      for name, n in KARPATHY_SPLITS.items()])
  info = dataset_info.DatasetInfo(builder=identity, features=features,
                                  split_dict=splits)
  info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD)
  info.write_to_directory(directory)
  return root


def mock_coco(metadata_dir, num_examples=16):
  return tfds.testing.mock_data(num_examples=num_examples,
                                policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=str(metadata_dir))


def smoke_config(data_dir):
  config = configs.apply_overrides(configs.load_config(CONFIG),
                                   [f"data_dir={data_dir}"])
  experiment.check_config(config)
  return config


def test_pipeline_reads_coco_captions_records(metadata_dir, tmp_path):
  config = smoke_config(tmp_path)
  with mock_coco(metadata_dir):
    source = pipeline.data_source(config, "train")
    record = source[0]
    assert record["image"].ndim == 3 and isinstance(record["captions"], dict)
    example = pipeline.train_transforms(
        pipeline.grain.MapDataset.source(source).seed(0), config)[0]
    eval_batch = next(iter(pipeline.EvalBatches(
        pipeline.data_source(config, "test"), config, 8,
        parallel.batch_sharding(parallel.make_mesh(0)))))
  assert set(example) == {"image", "mask/image", "text", "mask/text"}
  assert example["image"].shape == (32, 32, 3)
  assert example["image"].dtype == np.uint8
  assert example["text"].shape == (config.text.max_length,)
  # The caption's bytes survive tokenisation: it is one of the record's.
  captions = [c.decode() if isinstance(c, bytes) else c
              for c in record["captions"]["text"]]
  decoded = pipeline.ByteTokenizer(config.text.max_length).decode(
      example["text"][None])[0]
  assert any(c[:config.text.max_length - 1] == decoded for c in captions)
  assert eval_batch["text"].shape == (8, 5, config.text.max_length)
  assert eval_batch["valid/text"].shape == (8, 5)


def test_smoke_trains_and_evaluates_on_mock_data(metadata_dir, tmp_path):
  config = smoke_config(tmp_path / "tfds")
  with mock_coco(metadata_dir):
    train.train(config, str(tmp_path / "run"))
  rows = [json.loads(line) for line in
          (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert losses and all(np.isfinite(losses))
  final = [r for r in rows if "wall_time_s" in r][-1]
  assert final["step"] == config.total_steps
  for direction in ("text_to_image", "image_to_text"):
    for k in (1, 5, 10):
      value = final[f"eval/coco_captions_2014/retrieval/{direction}/R@{k}"]
      assert 0 <= value <= 1
  # 16 test images: R@10 retrieves at least as often as R@1.
  assert (final["eval/coco_captions_2014/retrieval/text_to_image/R@10"] >=
          final["eval/coco_captions_2014/retrieval/text_to_image/R@1"])


@pytest.mark.parametrize("objective", [
    "captioning", pytest.param("coca", marks=pytest.mark.slow)])
def test_captioning_smoke_trains_and_scores_captions_on_mock_data(
    metadata_dir, tmp_path, objective):
  config = configs.apply_overrides(
      configs.load_config(f"{CONFIG},objective={objective}"),
      [f"data_dir={tmp_path / 'tfds'}", "generation.max_new_tokens=6"])
  experiment.check_config(config)
  with mock_coco(metadata_dir):
    train.train(config, str(tmp_path / "run"))
  rows = [json.loads(line) for line in
          (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  final = [r for r in rows if "wall_time_s" in r][-1]
  for name in ("BLEU-4", "CIDEr-D", "ROUGE-L"):
    assert np.isfinite(final[f"eval/coco_captions_2014/captioning/{name}"])


def test_unprepared_dataset_is_a_usage_error(tmp_path):
  config = smoke_config(tmp_path / "empty")
  with pytest.raises(UsageError, match="coco_captions/2014:1.1.0 is not "
                     "prepared in .*tfds build coco_captions"):
    pipeline.data_source(config, "train")
