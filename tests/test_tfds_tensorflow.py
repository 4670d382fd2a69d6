"""tfds catalogue datasets whose builders need TensorFlow to prepare: made
with TensorFlow, read by mmjax without it.

coco_captions needs TensorFlow even for its builder (coco.py's features name
tf.int64); imagenet2012 and imagenet_v2 list and read their archives with
tf.io.gfile. mmjax reads what they prepared, array_record files, without
TensorFlow ("tfds:NAME/CONFIG:VERSION", `pipeline.data_source`). These tests
need TensorFlow, the `tensorflow` extra: `.ci/tensorflow` makes a venv with
it and runs them (`pytest -m tensorflow`). The default suite deselects them
(pytest.ini), and without TensorFlow they skip.

- `tfds.testing.mock_data`'s default policy, with TensorFlow: random records
  from the builders' own code, read through `pipeline.data_source`; the
  features of coco_captions' builder are those that tests/test_coco_captions
  writes by hand for its TensorFlow-free mock.
- Prepared with TensorFlow, read without: tiny raw data in each builder's own
  layout (ImageNet's manual-download tars; COCO's extracted zips and
  Karpathy's split file; ImageNet-V2's extracted tar: given to the builders
  in place of their downloads), prepared by the code of `tfds build NAME
  --file_format=array_record`. In a process that cannot find TensorFlow,
  preparing fails, but mmjax reads every record as written and runs
  configs/coco_captions.py:smoke and configs/zero_shot_imagenet.py (the tiny
  CLIP) end to end on the files.
"""

import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mmjax import configs, experiment
from mmjax.data import pipeline
from test_coco_captions import (  # noqa: F401  (metadata_dir: a fixture)
    CONFIG as COCO_CONFIG, metadata_dir)
from test_zero_shot_imagenet import (
    CLIP_DIR, CONFIG as ZERO_SHOT_CONFIG, NUM_EXAMPLES, _with_split)

pytestmark = pytest.mark.tensorflow

REPO = pathlib.Path(__file__).resolve().parents[1]
ZERO_SHOT = f"{ZERO_SHOT_CONFIG}:clip={CLIP_DIR},batch=16"

# Put on PYTHONPATH, makes `import tensorflow` (and importlib.util.find_spec,
# which tfds and etils ask) find nothing: the process is as without it.
WITHOUT_TENSORFLOW = '''
import importlib.machinery
import sys


class PathFinderWithoutTensorFlow:
  @staticmethod
  def find_spec(name, path=None, target=None):
    if name.partition(".")[0] == "tensorflow":
      return None
    return importlib.machinery.PathFinder.find_spec(name, path, target)

  @staticmethod
  def invalidate_caches():
    importlib.machinery.PathFinder.invalidate_caches()


sys.meta_path[:] = [PathFinderWithoutTensorFlow
                    if f is importlib.machinery.PathFinder else f
                    for f in sys.meta_path]
'''

# `tfds build ARGS`: the CLI's build command and flags. (tfds 4.9.10's
# `tfds` entry point also imports apache_beam and mlcroissant for its other
# commands.) $FAKE_DOWNLOADS, a JSON file {key or URL: directory}, stands
# for DownloadManager.download_and_extract, as tfds's own builder tests do.
TFDS_BUILD = '''
import json, os, sys
from unittest import mock
import tensorflow_datasets as tfds
from tensorflow_datasets.scripts.cli import build, cli_utils

if os.environ.get("FAKE_DOWNLOADS"):
  with open(os.environ["FAKE_DOWNLOADS"]) as f:
    downloads = json.load(f)
  mock.patch.object(
      tfds.download.DownloadManager, "download_and_extract",
      lambda self, urls: downloads[urls] if isinstance(urls, str) else
      {k: downloads[k] for k in urls}).start()
parse = cli_utils.make_flags_parser(build.Args, description="tfds build")
parse(["tfds build", *sys.argv[1:]]).execute()
'''

# Without TensorFlow: every record of SPLIT through pipeline.data_source
# (one JSON line), then, given a WORKDIR, `python -m mmjax.train` of the
# config (3 of the 80 zero-shot templates, for time, as
# test_zero_shot_imagenet).
READ_AND_TRAIN = '''
import json, sys
from mmjax import configs, train
from mmjax.data import imagenet, pipeline

config_arg, data_dir, split, *workdir = sys.argv[1:]
templates = imagenet.templates()[:3]
imagenet.templates = lambda: templates
config = configs.apply_overrides(configs.load_config(config_arg),
                                 [f"data_dir={data_dir}"])


def plain(value):
  if isinstance(value, bytes):
    return value.decode()
  if isinstance(value, dict):
    return {k: plain(v) for k, v in value.items()}
  if hasattr(value, "tolist"):
    return plain(value.tolist()) if value.ndim else plain(value.item())
  if isinstance(value, list):
    return [plain(v) for v in value]
  return value


source = pipeline.data_source(config, split)
records = []
for i in range(len(source)):
  record = dict(source[i])
  shape = list(record.pop("image").shape)
  records.append({"image_shape": shape, **plain(record)})
print(json.dumps({"records": records}))
status = train.main([
    "--config", config_arg, "--workdir", workdir[0],
    f"--config.data_dir={data_dir}"]) if workdir else None
print(json.dumps({"status": status,
                  "tensorflow_imported": "tensorflow" in sys.modules}))
'''


@pytest.fixture(autouse=True)
def tensorflow():
  return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def without_tensorflow(tmp_path_factory):
  """The environment of a subprocess that cannot find TensorFlow."""
  directory = tmp_path_factory.mktemp("without_tensorflow")
  (directory / "sitecustomize.py").write_text(WITHOUT_TENSORFLOW)
  path = os.pathsep.join(filter(None, [str(directory),
                                       os.environ.get("PYTHONPATH")]))
  return {**os.environ, "PYTHONPATH": path}


def _run(script: str, *args, env=None, check=True):
  result = subprocess.run([sys.executable, "-c", script, *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=420, check=False)
  if check and result.returncode:
    raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}"
                         f"\n{result.stderr[-6000:]}")
  return result


def _tfds_build(*args, env=None, downloads=None, check=True):
  if downloads is not None:
    env = {**(env or os.environ), "FAKE_DOWNLOADS": str(downloads)}
  return _run(TFDS_BUILD, *args, env=env, check=check)


def _build_only_with_tensorflow(args, without_tensorflow, downloads=None):
  """`tfds build ARGS` fails where TensorFlow cannot be imported, then
  prepares the dataset where it can."""
  failed = _tfds_build(*args, env=without_tensorflow, downloads=downloads,
                       check=False)
  assert failed.returncode and ("No module named 'tensorflow'" in
                                failed.stderr), failed.stderr[-2000:]
  _tfds_build(*args, downloads=downloads)


def _read_and_train(config_arg, data_dir, split, env, workdir=None):
  """The records (each with its image's shape) and, given a workdir, the
  run's final metrics, read and trained without TensorFlow."""
  lines = [json.loads(l) for l in _run(
      READ_AND_TRAIN, config_arg, data_dir, split, *filter(None, [workdir]),
      env=env).stdout.splitlines() if l.startswith("{")]
  assert lines[-1] == {"status": 0 if workdir else None,
                       "tensorflow_imported": False}
  if not workdir:
    return lines[0]["records"], None
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl")
          .read_text().splitlines()]
  return lines[0]["records"], [r for r in rows if "wall_time_s" in r][-1]


def _jpeg(rng, height, width) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(
      buffer, format="JPEG")
  return buffer.getvalue()


def _add(tar, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


# With TensorFlow, the builders' own code (tfds.testing.mock_data's default
# policy, as no metadata files are there).


def test_coco_captions_builder_has_the_no_tensorflow_tests_features(
    metadata_dir, tmp_path):
  code = tfds.builder("coco_captions/2014:1.1.0", data_dir=str(tmp_path))
  files = tfds.builder_from_directory(
      str(metadata_dir / "coco_captions" / "2014" / "1.1.0"))
  assert code.info.features.to_json() == files.info.features.to_json()


@pytest.mark.parametrize("config_arg,split", [
    (COCO_CONFIG, "test"),
    (ZERO_SHOT, "validation"),
    (f"{ZERO_SHOT},dataset=imagenet_v2", "test"),
], ids=["coco_captions", "imagenet2012", "imagenet_v2"])
def test_mock_data_from_builder_code(config_arg, split, tmp_path,
                                     monkeypatch):
  config = configs.apply_overrides(configs.load_config(config_arg),
                                   [f"data_dir={tmp_path}"])
  experiment.check_config(config)
  _with_split(monkeypatch, split)  # code-built infos have no splits
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    source = pipeline.data_source(config, split)
    assert len(source) == NUM_EXAMPLES
    example = pipeline.train_transforms(
        pipeline.grain.MapDataset.source(source).seed(0), config)[0]
  size = config.image_size
  assert example["image"].shape == (size, size, 3)
  assert example["text"].shape == (config.text.max_length,)


# Prepared with TensorFlow, read without.


def test_imagenet2012_prepared_with_tensorflow_read_without(
    tmp_path, without_tensorflow):
  """The two manual-download tars (20 validation images, 2 classes of 3
  training images), `tfds build imagenet2012 --manual_dir=DIR
  --file_format=array_record`, then zero-shot ImageNet on the files."""
  rng = np.random.default_rng(0)
  manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
  manual.mkdir()
  shapes = {}
  with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as tar:
    for i in range(1, 21):
      name, shapes[name] = f"ILSVRC2012_val_{i:08d}.JPEG", (40 + i, 60, 3)
      _add(tar, name, _jpeg(rng, *shapes[name][:2]))
  synsets = ("n01440764", "n01443537")
  with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as tar:
    for synset in synsets:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as class_tar:
        for j in range(3):
          _add(class_tar, f"{synset}_{j}.JPEG", _jpeg(rng, 50, 70))
      _add(tar, f"{synset}.tar", inner.getvalue())
  args = ["imagenet2012", f"--data_dir={data_dir}", f"--manual_dir={manual}",
          "--file_format=array_record"]

  _build_only_with_tensorflow(args, without_tensorflow)
  prepared = data_dir / "imagenet2012" / "5.1.0"
  assert sorted(p.name for p in prepared.glob("*.array_record*")) == [
      "imagenet2012-train.array_record-00000-of-00001",
      "imagenet2012-validation.array_record-00000-of-00001"]

  records, final = _read_and_train(ZERO_SHOT, data_dir, "validation",
                                   without_tensorflow, tmp_path / "run")
  labels = tfds.core.tfds_path(
      "datasets/imagenet2012/labels.txt").read_text().split()
  validation_labels = tfds.core.tfds_path(
      "datasets/imagenet2012/validation_labels.txt").read_text().split()
  assert sorted(r["file_name"] for r in records) == sorted(shapes)
  for r in records:  # the i-th validation image has the i-th label
    assert r["image_shape"] == list(shapes[r["file_name"]])
    i = int(r["file_name"][len("ILSVRC2012_val_"):-len(".JPEG")])
    assert r["label"] == labels.index(validation_labels[i - 1])
  accuracy = final["eval/imagenet2012_validation/zero_shot/accuracy"]
  assert 0.0 <= accuracy <= 1.0


def test_imagenet_v2_prepared_with_tensorflow_read_without(
    tmp_path, without_tensorflow):
  """ImageNet-V2's extracted download (3 classes of 2 images), `tfds build
  imagenet_v2/matched-frequency --file_format=array_record`, then its test
  split through pipeline.data_source."""
  rng = np.random.default_rng(2)
  extracted = tmp_path / "extracted"
  shapes = {}
  for class_id in ("0", "7", "999"):
    directory = extracted / "imagenetv2-matched-frequency-format-val" / class_id
    directory.mkdir(parents=True)
    for j in range(2):
      shapes[f"{class_id}/{j}.jpeg"] = (36 + j, 44 + int(class_id) % 5, 3)
      (directory / f"{j}.jpeg").write_bytes(
          _jpeg(rng, *shapes[f"{class_id}/{j}.jpeg"][:2]))
  url = ("https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/"
         "imagenetv2-matched-frequency.tar.gz")
  (tmp_path / "downloads.json").write_text(json.dumps({url: str(extracted)}))
  data_dir = tmp_path / "tfds"
  args = ["imagenet_v2/matched-frequency", f"--data_dir={data_dir}",
          "--file_format=array_record"]

  _build_only_with_tensorflow(args, without_tensorflow,
                              tmp_path / "downloads.json")

  records, _ = _read_and_train(f"{ZERO_SHOT},dataset=imagenet_v2", data_dir,
                               "test", without_tensorflow)
  assert sorted(r["file_name"] for r in records) == sorted(shapes)
  for r in records:
    assert r["image_shape"] == list(shapes[r["file_name"]])
    assert r["label"] == int(r["file_name"].partition("/")[0])


def _coco_downloads(root: pathlib.Path, rng) -> tuple[dict, dict]:
  """COCO 2014's extracted downloads, as coco_captions reads them: 8 train
  images (train2014) and 12 of val2014 (test 8, val 2, restval 2), 5
  captions each. Returns ({download key: directory}, {file name: (shape,
  split, captions)})."""
  directories = {key: root / key for key in (
      "images", "annotations", "karpathy", "unused")}
  for directory in directories.values():
    directory.mkdir(parents=True)
  categories = [{"id": i + 1, "name": f"category{i}", "supercategory": "x"}
                for i in range(80)]
  expected, karpathy = {}, []
  for coco_split, first_id, splits in (
      ("train2014", 1000, ["train"] * 8),
      ("val2014", 2000, ["test"] * 8 + ["val"] * 2 + ["restval"] * 2)):
    (directories["images"] / coco_split).mkdir()
    images, annotations = [], []
    for i, split in enumerate(splits):
      image_id = first_id + i
      name = f"COCO_{coco_split}_{image_id:012d}.jpg"
      height, width = 30 + 2 * i, 48
      (directories["images"] / coco_split / name).write_bytes(
          _jpeg(rng, height, width))
      images.append({"id": image_id, "file_name": name, "height": height,
                     "width": width})
      annotations.append({"id": image_id, "image_id": image_id,
                          "category_id": 1 + i, "bbox": [1, 2, 10, 12],
                          "area": 120, "iscrowd": 0})
      captions = [f"{split} image {image_id} caption {k}" for k in range(5)]
      karpathy.append({"split": split, "filename": name, "sentences": [
          {"sentid": 10 * image_id + k, "raw": c}
          for k, c in enumerate(captions)]})
      expected[name] = ([height, width, 3], split, captions)
    (directories["annotations"] / "annotations").mkdir(exist_ok=True)
    (directories["annotations"] / "annotations" /
     f"instances_{coco_split}.json").write_text(json.dumps(
         {"categories": categories, "images": images,
          "annotations": annotations}))
  (directories["karpathy"] / "dataset_coco.json").write_text(
      json.dumps({"images": karpathy}))
  downloads = {"train_images": directories["images"],
               "validation_images": directories["images"],
               "train_annotations": directories["annotations"],
               "validation_annotations": directories["annotations"],
               "karpathy_and_li_splits": directories["karpathy"]}
  for split in ("test", "test2015"):  # read only by coco, not coco_captions
    downloads[f"{split}_images"] = directories["unused"]
    downloads[f"{split}_annotations"] = directories["unused"]
  return {k: str(v) for k, v in downloads.items()}, expected


def test_coco_captions_prepared_with_tensorflow_read_without(
    tmp_path, without_tensorflow):
  """COCO 2014's downloads (20 images), `tfds build coco_captions
  --file_format=array_record`, then the coco_captions smoke run (training
  and retrieval) on the files."""
  downloads, expected = _coco_downloads(tmp_path / "raw",
                                        np.random.default_rng(1))
  (tmp_path / "downloads.json").write_text(json.dumps(downloads))
  data_dir = tmp_path / "tfds"
  args = ["coco_captions", f"--data_dir={data_dir}",
          "--file_format=array_record"]

  _build_only_with_tensorflow(args, without_tensorflow,
                              tmp_path / "downloads.json")
  info = json.loads((data_dir / "coco_captions" / "2014" / "1.1.0" /
                     "dataset_info.json").read_text())
  assert {s["name"]: int(s["shardLengths"][0]) for s in info["splits"]} == {
      "train": 8, "test": 8, "val": 2, "restval": 2}
  assert info["fileFormat"] == "array_record"

  records, final = _read_and_train(COCO_CONFIG, data_dir, "test",
                                   without_tensorflow, tmp_path / "run")
  assert sorted(r["image/filename"] for r in records) == sorted(
      n for n, (_, split, _) in expected.items() if split == "test")
  for r in records:
    shape, _, captions = expected[r["image/filename"]]
    assert r["image_shape"] == shape
    assert r["captions"]["text"] == captions
    assert len(r["objects"]["label"]) == 1
  for direction in ("text_to_image", "image_to_text"):
    for k in (1, 5, 10):
      value = final[f"eval/coco_captions_2014/retrieval/{direction}/R@{k}"]
      assert 0 <= value <= 1
  # 8 test images: R@10 retrieves every image.
  assert final["eval/coco_captions_2014/retrieval/text_to_image/R@10"] == 1
