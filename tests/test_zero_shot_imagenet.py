"""Zero-shot ImageNet (configs/zero_shot_imagenet.py) end to end on tfds mock
data with the tiny CLIP fixture, and the shipped class names and templates.

tfds's mock_data (MockPolicy.USE_CODE) makes random records from the
dataset's feature spec without TensorFlow; tfds ships no dataset_info for
imagenet2012 / imagenet_v2, so the mocked builders have no splits and the
test gives them the evaluated one (`_with_split`).
"""

import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmjax import configs, evaluate, evaluators, experiment, train
from mmjax.data import imagenet

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "zero_shot_imagenet.py"
CLIP_DIR = REPO / "tests" / "data" / "clip_tiny_hf"
TEMPLATES = imagenet.templates()
NUM_EXAMPLES = 20  # not a multiple of the batch: padding is exercised


def test_assets():
  names, templates = imagenet.class_names(), imagenet.templates()
  assert len(names) == 1000 and len(templates) == 80
  assert names[0] == "tench" and names[999] == "toilet paper"
  # CLIP's list repeats two names (PROVENANCE.md); all others are unique.
  repeated = {n for n in names if names.count(n) > 1}
  assert repeated == {"missile", "sunglasses"}
  assert len(set(names)) == 998
  assert all(n and n == n.strip() for n in names)
  assert len(set(templates)) == 80
  assert all(t.count("{}") == 1 for t in templates)
  provenance = (pathlib.Path(imagenet.__file__).parent /
                "PROVENANCE.md").read_text()
  assert "Copyright (c) 2021 OpenAI" in provenance
  assert "MIT License" in provenance


def _with_split(monkeypatch, split: str):
  """tfds.builder, mocked builders getting `split` (NUM_EXAMPLES records)."""
  original = tfds.builder

  def builder(name, **kwargs):
    b = original(name, **kwargs)
    if not b.info.splits:
      b.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
          name=split, shard_lengths=[NUM_EXAMPLES], num_bytes=0)]))
    return b
  monkeypatch.setattr(tfds, "builder", builder)


@pytest.mark.parametrize("dataset,split", [("imagenet2012", "validation"),
                                           ("imagenet_v2", "test")])
def test_config(dataset, split):
  config = configs.load_config(f"{CONFIG}:clip={CLIP_DIR},dataset={dataset}")
  experiment.check_config(config)
  assert config.image_size == 64  # the checkpoint's
  assert config.eval_splits == (split,) and config.batch_size % 8 == 0
  prompts = config.evaluators.zero_shot.prompts
  assert len(prompts.class_names) == 1000 and len(prompts.templates) == 80


def test_end_to_end(tmp_path, monkeypatch):
  """The documented command (one frozen step, then the evaluation) on 20
  mock validation images: an accuracy in [0, 1], the 1000 classes embedded
  (with 3 templates), and the weights exactly as loaded from the
  checkpoint."""
  _with_split(monkeypatch, "validation")
  # 3 of the 80 templates, for time: 3,000 prompts, embedded in chunks of
  # 1024 (the last one padded); test_config checks that the config has all
  # 80.
  monkeypatch.setattr(imagenet, "templates",
                      lambda: TEMPLATES[:3])
  embedded = []
  original = evaluators.Evaluator.class_embeddings

  def class_embeddings(self, predict_fn):
    emb = original(self, predict_fn)
    embedded.append(emb.shape)
    return emb
  monkeypatch.setattr(evaluators.Evaluator, "class_embeddings",
                      class_embeddings)
  workdir = tmp_path / "run"
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    status = train.main([
        "--config", f"{CONFIG}:clip={CLIP_DIR},batch=16",
        "--workdir", str(workdir), f"--config.data_dir={tmp_path}"])
    assert status == 0
    # The saved checkpoint evaluates again (`python -m mmjax.evaluate`).
    assert evaluate.main([
        "--config", f"{CONFIG}:clip={CLIP_DIR},batch=16",
        "--workdir", str(workdir), f"--config.data_dir={tmp_path}"]) == 0
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text()
          .splitlines()]
  key = "eval/imagenet2012_validation/zero_shot/accuracy"
  final = [r for r in rows if key in r]
  assert final, rows
  assert 0.0 <= final[-1][key] <= 1.0
  assert embedded and all(shape[0] == 1000 for shape in embedded)  # [K, D]

  # The one step changed nothing: the checkpoint holds the CLIP weights.
  from mmjax import checkpoint  # pylint: disable=import-outside-toplevel
  from mmjax.models import clip  # pylint: disable=import-outside-toplevel
  saved = checkpoint.read_params(str(workdir))
  _, loaded = clip.load_clip(CLIP_DIR)
  np.testing.assert_array_equal(
      np.asarray(saved["log_scale"]), np.asarray(loaded["log_scale"]))
  np.testing.assert_array_equal(
      *[np.asarray(p["tower_image"]["projection"]["kernel"])
        for p in (saved, loaded)])
