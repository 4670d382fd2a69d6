"""Captioning through the ordinary trainer, then `python -m mmjax.generate`."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmjax import configs, experiment, objectives
from mmjax.models import factory
from mmjax.models.coca import CoCa
from mmjax.data import pipeline
from mmjax.data.builders import digits_qa
from mmjax.errors import UsageError

REPO = pathlib.Path(__file__).resolve().parents[1]
# A tiny model: 4 image tokens, a 1-layer decoder, 12 steps.
TINY = ["--config.model.encoders.image.width=4",
        "--config.model.decoder.width=32", "--config.model.decoder.num_layers=1",
        "--config.model.decoder.mlp_dim=64", "--config.total_steps=12",
        "--config.optimizer.warmup_steps=2", "--config.checkpoint_every=12",
        "--config.log_every=6", "--config.generation.max_new_tokens=8",
        "--config.eval_batch_size=8"]


def run(module, workdir, data_dir, *extra, config="configs/coco_mini_captioning.py"):
  return subprocess.run(
      [sys.executable, "-m", module, "--config", config, "--workdir",
       str(workdir), f"--config.data_dir={data_dir}", *TINY, *extra],
      capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A captioning run on coco_mini (built here), trained 12 steps."""
  data_dir = tmp_path_factory.mktemp("tfds")
  workdir = tmp_path_factory.mktemp("captioning")
  result = run("mmjax.train", workdir, data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, data_dir


def test_training_evaluates_caption_metrics(trained):
  workdir, _ = trained
  rows = [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]
  final = rows[-1]
  for metric in ("BLEU-4", "CIDEr-D", "ROUGE-L"):
    assert np.isfinite(final[f"eval/coco_mini/captioning/{metric}"])
  assert any("train/token_accuracy" in r for r in rows)


def test_generate_writes_the_split_and_never_overwrites(trained):
  workdir, data_dir = trained
  first = run("mmjax.generate", workdir, data_dir, "--split", "test",
              "--num_examples", "5")
  assert first.returncode == 0, first.stderr[-3000:]
  path = workdir / "generations" / "test_step12_greedy.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert len(rows) == 5 and all(len(r["references"]) == 5 for r in rows)
  assert all(isinstance(r["generation"], str) for r in rows)
  assert str(path) in first.stdout
  again = run("mmjax.generate", workdir, data_dir, "--split", "test",
              "--num_examples", "5", "--config.generation.method=beam",
              "--config.generation.beam_size=2")
  assert again.returncode == 0, again.stderr[-3000:]
  assert (workdir / "generations" / "test_step12_beam.jsonl").is_file()
  assert path.read_text().splitlines() == [json.dumps(r) for r in rows]


def test_generate_from_an_image_file_and_bad_files(trained, tmp_path):
  workdir, data_dir = trained
  image = tmp_path / "photo.png"
  Image.fromarray(np.random.default_rng(0).integers(
      0, 255, (100, 80, 3), np.uint8)).save(image)
  result = run("mmjax.generate", workdir, data_dir, "--image", str(image))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "wrote 1 generations" in result.stdout
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png")
  for args, message in ((["--image", str(broken)], "cannot read it"),
                        (["--image", str(tmp_path / "none.png")],
                         "no such file"),
                        (["--audio", str(image)], "this model reads image"),
                        (["--prompt", "what?"], "not trained with prompts")):
    bad = run("mmjax.generate", workdir, data_dir, *args)
    assert bad.returncode == 2, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), bad.stderr
    assert message in lines[0]


def test_generate_refuses_a_classifier(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "mmjax.generate", "--config",
       "configs/avmnist.py", "--workdir", str(tmp_path)],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode == 2
  assert "do not generate text" in result.stderr


def test_digits_qa_config_names_the_builders_families_and_answers():
  spec = configs.load_config("configs/digits_qa.py:model=classifier")
  assert tuple(spec.evaluators.vqa.families) == digits_qa.FAMILIES
  assert tuple(spec.evaluators.vqa.answers) == digits_qa.ANSWERS


def test_digits_qa_registers_reach_the_model_and_refuse_flamingo():
  spec = configs.load_config(
      "configs/digits_qa.py:model=cross_attention,registers=2")
  assert spec.model.registers == 2
  with pytest.raises(UsageError, match="registers needs model=prefix"):
    configs.load_config("configs/digits_qa.py:model=flamingo,registers=1")


def test_tokenize_fields_shortens_and_keeps_the_end_token():
  tokenizer = pipeline.ByteTokenizer(16)
  fields = pipeline.TokenizeFields(tokenizer, (("question", "prompt"),
                                               ("answer", "text")),
                                   (("text", 4),))
  out = fields.map({"question": b"where?", "answer": b"top left"})
  assert tokenizer.decode(out["prompt"][None]) == ["where?"]
  np.testing.assert_array_equal(out["text"], [ord("t") + 3, ord("o") + 3,
                                              ord("p") + 3, tokenizer.eos_id])
  short = fields.map({"question": b"q", "answer": b"no"})["text"]
  np.testing.assert_array_equal(short, [ord("n") + 3, ord("o") + 3,
                                        tokenizer.eos_id, 0])


def test_coca_config_builds_coca_with_its_loss_weights():
  config = configs.load_config("configs/coco_mini_captioning.py:model=coca")
  experiment.check_config(config)
  assert isinstance(factory.build_model(config), CoCa)
  objective = objectives.make_objective("coca", None,
                                        **config.objective_kwargs)
  assert objectives.whole_batch(objective)
  bad = configs.apply_overrides(config, ["objective_kwargs.caption_weight=0",
                                         "objective_kwargs.contrastive_weight=0"])
  with pytest.raises(Exception, match="objective_kwargs"):
    experiment.check_config(bad)
