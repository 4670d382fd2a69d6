"""CLIP checkpoints (mmjax.models.clip) against their reference libraries.

The fixtures in tests/data were written by transformers and open_clip
(tests/data/make_clip_fixtures.py) with the references' embeddings, so the
parity checks run without torch; the live checks build further models with
the references when the convert extra and open_clip are installed.
"""

import importlib.util
import json
import pathlib
import shutil

import flax
import jax
import numpy as np
import pytest

from mmjax import experiment
from mmjax.configs import load_config
from mmjax.data.tokenizer import clip_tokenizer
from mmjax.errors import UsageError
from mmjax.models import clip
from mmjax.models.clip_config import CLIP_MEAN, CLIP_STD

import lit_run  # tests/lit_run.py

DATA = pathlib.Path(__file__).parent / "data"
FIXTURES = {"hf": DATA / "clip_tiny_hf", "open_clip": DATA / "clip_tiny_open_clip"}
TEXTS = ["A man riding a wave on top of a surfboard.", "a", "Ünïcödé café",
         "two dogs 🐶🐶 playing", "THE QUICK BROWN FOX",
         "a photo of " + "very " * 40 + "long text", "", "it's 3 o'clock"]
has = lambda *packages: all(importlib.util.find_spec(p) for p in packages)
needs_references = pytest.mark.skipif(
    not has("torch", "transformers", "open_clip"),
    reason="needs the convert extra and open_clip_torch")


def embed(directory, pixels, ids):
  config, params = clip.load_clip(directory)
  model = clip.build_clip(config)
  out = model.apply({"params": {**params, "bias": np.zeros((), np.float32)}},
                    {"image": pixels, "text": ids})
  return config, params, out


def parity(got, want):
  """(max abs difference, min cosine) of rows of unit vectors."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  cosine = np.sum(got * want, -1) / (np.linalg.norm(got, axis=-1)
                                     * np.linalg.norm(want, axis=-1))
  return np.abs(got - want).max(), cosine.min()


@pytest.mark.parametrize("fmt", sorted(FIXTURES))
def test_embeddings_match_the_reference_library(fmt):
  ref = np.load(FIXTURES[fmt] / "reference.npz")
  _, params, out = embed(FIXTURES[fmt], ref["pixels"], ref["ids"])
  for modality in ("image", "text"):
    diff, cosine = parity(out[f"embedding/{modality}"],
                          ref[f"{modality}_embeds"])
    assert diff < 1e-5 and cosine > 1 - 1e-6, (modality, diff, cosine)
  np.testing.assert_allclose(params["log_scale"], ref["logit_scale"])


@pytest.mark.parametrize("fmt", sorted(FIXTURES))
def test_tokenizer_gives_the_reference_ids(fmt):
  ref = np.load(FIXTURES[fmt] / "reference.npz")
  ids, mask = clip_tokenizer(FIXTURES[fmt], 32)(TEXTS)
  np.testing.assert_array_equal(ids, ref["ids"])
  tokenizer = clip_tokenizer(FIXTURES[fmt], 32)
  assert (ids[:, 0] == tokenizer.bos_id).all()
  assert mask[1].sum() == 3 and mask[6].sum() == 2  # "a" and ""
  assert ids[5, -1] == tokenizer.eos_id and mask[5].all()  # cut, end kept
  # Word ends become spaces, so punctuation stands apart (as in open_clip).
  assert tokenizer.decode(ids[:1]) == ["a man riding a wave on top of a "
                                       "surfboard ."]


def test_config_describes_the_checkpoint():
  config = clip.clip_config(FIXTURES["hf"])
  image, text = (config["model"]["encoders"][m] for m in ("image", "text"))
  assert config["image_size"] == 64 and config["max_length"] == 32
  assert (image["width"], image["depth"], image["patch_size"]) == (32, 2, 16)
  assert image["activation"] == text["activation"] == "quick_gelu"
  assert text["eos_id"] == clip_tokenizer(FIXTURES["hf"]).eos_id
  # open_clip reads the largest id (its "argmax" pool) with exact GELU.
  open_clip_text = clip.clip_config(FIXTURES["open_clip"])["model"][
      "encoders"]["text"]
  assert open_clip_text["eos_id"] is None
  assert open_clip_text["activation"] == "gelu"


def copy_fixture(tmp_path, fmt="hf"):
  directory = tmp_path / fmt
  shutil.copytree(FIXTURES[fmt], directory)
  return directory


def edit_json(path, edit):
  raw = json.loads(path.read_text())
  edit(raw)
  path.write_text(json.dumps(raw))


def test_checkpoint_that_does_not_fit_names_the_first_parameter(tmp_path):
  directory = copy_fixture(tmp_path)
  edit_json(directory / "config.json",
            lambda c: c["vision_config"].update(intermediate_size=48))
  with pytest.raises(ValueError, match=r"tower_image/encoder/block_0/mlp/"
                     r"dense_0/kernel: expected shape \(32, 48\), got \(32, 64\)"):
    clip.load_clip(directory)
  edit_json(directory / "config.json",
            lambda c: c["vision_config"].update(intermediate_size=64,
                                                num_hidden_layers=1))
  with pytest.raises(ValueError, match="vision_model.encoder.layers.1"):
    clip.load_clip(directory)


@pytest.mark.parametrize("fmt, key, value, message", [
    ("hf", "text_config", {"hidden_act": "relu"},
     "text_config.hidden_act='relu' is not supported"),
    ("open_clip", "vision_cfg", {"ls_init_value": 0.1},
     "model_cfg.vision_cfg.ls_init_value=0.1 is not supported"),
    ("open_clip", "text_cfg", {"pool_type": "last"},
     "model_cfg.text_cfg.pool_type='last' is not supported"),
])
def test_what_the_modules_lack_is_refused(tmp_path, fmt, key, value,
                                          message):
  directory = copy_fixture(tmp_path, fmt)
  if fmt == "hf":
    edit_json(directory / "config.json", lambda c: c[key].update(value))
  else:
    edit_json(directory / "open_clip_config.json",
              lambda c: c["model_cfg"][key].update(value))
  with pytest.raises(ValueError, match=message):
    clip.load_clip(directory)
  with pytest.raises(FileNotFoundError, match="not a CLIP checkpoint"):
    clip.load_clip(tmp_path)


def test_config_errors_are_usage_errors(tmp_path):
  with pytest.raises(UsageError, match="needs clip=DIR"):
    load_config("configs/lit_clip.py")
  with pytest.raises(UsageError, match="not a CLIP checkpoint"):
    load_config(f"configs/lit_clip.py:clip={tmp_path}")


def test_lit_trains_the_text_tower_against_the_locked_clip_image_tower(
    tmp_path):
  config = load_config(f"configs/lit_clip.py:clip={FIXTURES['hf']},smoke")
  params = lit_run.train_lit(config, tmp_path)
  lit_run.assert_image_locked_text_moved(params,
                                         clip.load_clip(FIXTURES["hf"])[1])


class Holder(flax.struct.PyTreeNode):
  params: dict


def test_model_init_that_does_not_fit_names_the_parameter():
  config = load_config(f"configs/lit_clip.py:clip={FIXTURES['hf']},smoke")
  config.model.embed_dim = 16
  params = experiment.build_model(config).init(
      jax.random.key(0), {"image": np.zeros((1, 64, 64, 3), np.uint8),
                          "text": np.zeros((1, 32), np.int32)})["params"]
  with pytest.raises(UsageError, match=r"tower_image/projection/kernel: "
                     r"expected shape \(32, 16\), got \(32, 24\)"):
    experiment.load_pretrained(Holder(params), {
        "tower_image": f"clip:{FIXTURES['hf']}"})
  with pytest.raises(UsageError, match="no parameters at 'tower_audio'"):
    experiment.pretrained_weights("tower_audio", f"clip:{FIXTURES['hf']}")
  loaded = experiment.load_pretrained(Holder(params), {
      "log_scale": f"clip:{FIXTURES['hf']}"}).params["log_scale"]
  np.testing.assert_allclose(
      loaded, np.load(FIXTURES["hf"] / "reference.npz")["logit_scale"])


# ------------------------------------------------- live reference checks ---


def bpe_tokenizer_json(tmp_path):
  """CLIP's real tokenizer.json, from the BPE merges open_clip ships."""
  import open_clip  # pylint: disable=import-outside-toplevel
  from transformers import CLIPTokenizer, CLIPTokenizerFast  # pylint: disable=import-outside-toplevel
  simple = open_clip.tokenizer.SimpleTokenizer()
  special = {"<start_of_text>": "<|startoftext|>",
             "<end_of_text>": "<|endoftext|>"}
  vocab = {special.get(k, k): v for k, v in simple.encoder.items()}
  (tmp_path / "vocab.json").write_text(json.dumps(vocab))
  merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
  (tmp_path / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  slow = CLIPTokenizer(str(tmp_path / "vocab.json"),
                       str(tmp_path / "merges.txt"))
  # transformers converts the BPE files to the tokenizer.json mmjax reads.
  CLIPTokenizerFast(str(tmp_path / "vocab.json"),
                    str(tmp_path / "merges.txt")).save_pretrained(tmp_path)
  return slow


@needs_references
def test_tokenizer_matches_open_clip_and_transformers_on_clips_vocabulary(
    tmp_path):
  slow = bpe_tokenizer_json(tmp_path)
  import open_clip  # pylint: disable=import-outside-toplevel
  ours, _ = clip_tokenizer(tmp_path, 77)(TEXTS)
  theirs = open_clip.tokenizer.tokenize(TEXTS, 77).numpy()
  eos = ours[0][np.argmax(ours[0] == 49407)]
  assert eos == 49407 and ours.shape == theirs.shape
  # open_clip pads with 0, mmjax with the end token (never read past it).
  np.testing.assert_array_equal(np.where(theirs == 0, 49407, theirs), ours)
  hf = slow(TEXTS, padding="max_length", max_length=77, truncation=True)
  np.testing.assert_array_equal(np.asarray(hf["input_ids"]), ours)


@needs_references
@pytest.mark.parametrize("eos_token_id, hidden_act", [(2, "quick_gelu"),
                                                      (98, "gelu")])
def test_live_clipmodel_parity(tmp_path, eos_token_id, hidden_act):
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import CLIPConfig, CLIPModel  # pylint: disable=import-outside-toplevel
  torch.manual_seed(2)
  config = CLIPConfig(
      text_config=dict(vocab_size=99, hidden_size=24, intermediate_size=40,
                       num_hidden_layers=3, num_attention_heads=3,
                       max_position_embeddings=12, eos_token_id=eos_token_id,
                       hidden_act=hidden_act),
      vision_config=dict(hidden_size=24, intermediate_size=40,
                         num_hidden_layers=3, num_attention_heads=3,
                         image_size=40, patch_size=8, hidden_act=hidden_act),
      projection_dim=16)
  reference = CLIPModel(config).eval()
  reference.save_pretrained(tmp_path)
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (3, 40, 40, 3)).astype(np.uint8)
  ids = rng.integers(3, 98, (3, 12)).astype(np.int32)
  ids[0, 5], ids[1, 11], ids[2, 1] = 98, 98, 98  # the end token
  x = (pixels / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
  with torch.no_grad():
    want = reference(input_ids=torch.tensor(ids, dtype=torch.long),
                     pixel_values=torch.tensor(x.transpose(0, 3, 1, 2),
                                               dtype=torch.float32))
  _, _, got = embed(tmp_path, pixels, ids)
  for modality, ref in (("image", want.image_embeds),
                        ("text", want.text_embeds)):
    diff, cosine = parity(got[f"embedding/{modality}"], ref.numpy())
    assert diff < 1e-5 and cosine > 1 - 1e-6, (modality, diff, cosine)
