"""SigLIP checkpoints (mmjax.models.siglip) against transformers.

The fixture tests/data/siglip_tiny_hf was written by transformers'
SiglipModel (tests/data/make_siglip_fixtures.py) with its embeddings, and
its SentencePiece tokenizer with SiglipTokenizer's ids of tricky texts
(tokenizer_reference.json), so the parity checks run without torch; the
live tokenizer check runs where transformers is installed.
"""

import importlib.util
import json
import pathlib
import random
import shutil
import warnings

import jax
import numpy as np
import pytest

from mmjax.data import pipeline
from mmjax.data.tokenizer import siglip_tokenizer
from mmjax.errors import UsageError
from mmjax.models import siglip

import lit_run  # tests/lit_run.py

FIXTURE = pathlib.Path(__file__).parent / "data" / "siglip_tiny_hf"


def parity(got, want):
  """(max abs difference, min cosine) of rows."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  cosine = np.sum(got * want, -1) / (np.linalg.norm(got, axis=-1)
                                     * np.linalg.norm(want, axis=-1))
  return np.abs(got - want).max(), cosine.min()


def test_embeddings_match_siglipmodel():
  ref = np.load(FIXTURE / "reference.npz")
  config, params = siglip.load_siglip(FIXTURE)
  out = siglip.build_siglip(config).apply(
      {"params": params}, {"image": ref["pixels"], "text": ref["ids"]})
  for modality in ("image", "text"):
    diff, cosine = parity(out[f"embedding/{modality}"],
                          ref[f"{modality}_embeds"])
    assert diff < 1e-5 and cosine > 1 - 1e-6, (modality, diff, cosine)
  np.testing.assert_allclose(out["log_scale"], ref["logit_scale"])
  np.testing.assert_allclose(out["bias"], ref["logit_bias"])


def test_config_describes_the_checkpoint():
  config = siglip.siglip_config(FIXTURE)
  model = config["model"]
  image, text = (model["encoders"][m] for m in ("image", "text"))
  assert config["image_size"] == 64 and config["max_length"] == 16
  assert (image["pool"], image["patch_bias"], image["pre_norm"]) == (
      "map", True, False)
  assert image["activation"] == text["activation"] == "gelu_tanh"
  assert (text["causal"], text["pool"]) == (False, "last")
  assert model["projections"] == {"image": "none", "text": "dense"}
  assert model["objective"] == "sigmoid" and model["embed_dim"] == 32
  assert image["frontend"]["mean"] == image["frontend"]["std"] == [0.5] * 3


def copy_fixture(tmp_path):
  directory = tmp_path / "siglip"
  shutil.copytree(FIXTURE, directory)
  return directory


def edit_config(directory, edit):
  raw = json.loads((directory / "config.json").read_text())
  edit(raw)
  (directory / "config.json").write_text(json.dumps(raw))


def test_checkpoint_that_does_not_fit_names_the_first_parameter(tmp_path):
  directory = copy_fixture(tmp_path)
  edit_config(directory,
              lambda c: c["vision_config"].update(intermediate_size=48))
  with pytest.raises(ValueError, match=r"tower_image/encoder/block_0/mlp/"
                     r"dense_0/kernel: expected shape \(32, 48\), got "
                     r"\(32, 64\)"):
    siglip.load_siglip(directory)
  edit_config(directory, lambda c: c["vision_config"].update(
      intermediate_size=64, num_hidden_layers=1))
  with pytest.raises(ValueError, match="vision_model.encoder.layers.1"):
    siglip.load_siglip(directory)


@pytest.mark.parametrize("key, value, message", [
    ("text_config", {"hidden_act": "relu"},
     "text_config.hidden_act='relu' is not supported"),
    ("vision_config", {"vision_use_head": False},
     "vision_config.vision_use_head=False is not supported"),
    ("text_config", {"projection_size": 16},
     "text_config.projection_size=16 is not supported"),
])
def test_what_the_modules_lack_is_refused(tmp_path, key, value, message):
  directory = copy_fixture(tmp_path)
  edit_config(directory, lambda c: c[key].update(value))
  with pytest.raises(ValueError, match=message):
    siglip.load_siglip(directory)
  edit_config(directory, lambda c: c.update(model_type="clip"))
  with pytest.raises(ValueError, match="model_type 'clip' is not 'siglip'"):
    siglip.load_siglip(directory)
  with pytest.raises(FileNotFoundError, match="not a SigLIP checkpoint"):
    siglip.load_siglip(tmp_path)


# --------------------------------------------------------- big_vision .npz ---
#
# big_vision's names (models/vit.py, models/proj/image_text/two_towers.py
# and text_transformer.py), written here from the Hugging Face fixture's
# converted tree, for the refusals below. Parity with big_vision's own
# model code: tests/test_big_vision_checkpoints.py.

BLOCK = {"norm_attention": "LayerNorm_0",
         "attention": "MultiHeadDotProductAttention_0",
         "norm_mlp": "LayerNorm_1", "mlp": "MlpBlock_0"}
MLP = {"dense_0": "Dense_0", "dense_1": "Dense_1"}
MAP = {"probe": "probe", "attention": "MultiHeadDotProductAttention_0",
       "norm": "LayerNorm_0", "mlp": "MlpBlock_0"}


def flatten(tree, prefix):
  if not isinstance(tree, dict):
    return {prefix: np.asarray(tree)}
  out = {}
  for key, value in tree.items():
    out.update(flatten(value, f"{prefix}/{key}"))
  return out


def big_vision_names(params, scan=False):
  renamed = lambda block, names: {names[k]: v for k, v in block.items()}
  block = lambda b: {**renamed(b, BLOCK),
                     "MlpBlock_0": renamed(b["mlp"], MLP)}
  vit = params["tower_image"]["encoder"]
  blocks = {f"encoderblock_{i}": block(vit[f"block_{i}"]) for i in range(2)}
  if scan:  # nn.scan's stacked layout
    blocks = {"encoderblock": jax.tree.map(
        lambda *a: np.stack(a), *[blocks[f"encoderblock_{i}"]
                                  for i in range(2)])}
  head = vit["map_head"]
  img = {"embedding": vit["embedding"], "pos_embedding": vit["pos_embedding"],
         "Transformer": {**blocks, "encoder_norm": vit["encoder_norm"]},
         "MAPHead_0": {**renamed(head, MAP),
                       "MlpBlock_0": renamed(head["mlp"], MLP)}}
  text = params["tower_text"]["encoder"]
  txt = {"Embed_0": text["token_embedding"],
         "pos_embedding": text["position_embedding"][None],
         "Encoder_0": {**{f"encoderblock_{i}": block(text[f"layer_{i}"])
                          for i in range(2)},
                       "encoder_norm": text["norm_out"]},
         "head": params["tower_text"]["projection"]}
  return {**flatten(img, "params/img"), **flatten(txt, "params/txt"),
          "params/t": np.reshape(params["log_scale"], (1,)),
          "params/b": np.reshape(params["bias"], (1,))}


def test_big_vision_npz_with_what_the_modules_lack_is_refused(tmp_path):
  _, params = siglip.load_siglip(FIXTURE)
  flat = big_vision_names(params)
  flat["params/img/cls"] = np.zeros((1, 1, 32), np.float32)
  np.savez(tmp_path / "siglip.npz", **flat)
  with pytest.raises(ValueError, match="img/cls is not supported"):
    siglip.load_siglip(tmp_path / "siglip.npz")
  del flat["params/img/cls"]
  flat["params/txt/Encoder_0/encoderblock_0/LayerScale_0/scale"] = np.ones(3)
  np.savez(tmp_path / "siglip.npz", **flat)
  with pytest.raises(ValueError, match="encoderblock_0/LayerScale_0 has no "
                     "place"):
    siglip.load_siglip(tmp_path / "siglip.npz")


# -------------------------------------------------------------- tokenizer ---


def tokenizer_reference():
  return json.loads((FIXTURE / "tokenizer_reference.json").read_text(
      encoding="utf-8"))


def test_tokenizer_gives_siglip_tokenizers_ids():
  pytest.importorskip("sentencepiece")
  ref = tokenizer_reference()
  tokenizer = siglip_tokenizer(FIXTURE, ref["max_length"])
  assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id,
          tokenizer.unk_id) == (100, 1, 1, 2)
  ids, mask = tokenizer(ref["texts"])
  assert ids.dtype == np.int32 and ids.shape == (20, 16)
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, np.asarray(ref["attention_mask"], bool))
  texts = ref["texts"]
  assert ids[texts.index(""), 0] == tokenizer.eos_id  # just the end token
  assert mask[texts.index("")].sum() == 1
  long = texts.index(next(t for t in texts if "very very" in t))
  assert ids[long, -1] == tokenizer.eos_id and mask[long].all()  # cut
  # Canonicalised: case and punctuation do not matter.
  same, _ = tokenizer(["Hello, World!", "hello world", "HELLO...WORLD"])
  assert (same[0] == same[1]).all() and not (same[0] == same[2]).all()
  assert tokenizer.decode(ids[-4:-1]) == [
      "a kitchen with a stove and a sink", "people standing on a street",
      "a pizza on a plate on a table next to a laptop"]


def test_tokenizer_text_embeddings_match_siglipmodel():
  """mmjax's ids through the converted model: SiglipModel's embeddings of
  SiglipTokenizer's ids, end to end."""
  pytest.importorskip("sentencepiece")
  ref = tokenizer_reference()
  ids, _ = siglip_tokenizer(FIXTURE, ref["max_length"])(ref["texts"])
  config, params = siglip.load_siglip(FIXTURE)
  images = np.zeros((len(ids), 64, 64, 3), np.uint8)
  out = siglip.build_siglip(config).apply(
      {"params": params}, {"image": images, "text": ids})
  diff, cosine = parity(out["embedding/text"], ref["text_embeds"])
  assert diff < 1e-5 and cosine > 1 - 1e-6, (diff, cosine)


def test_tokenizer_config_names_and_errors(tmp_path, monkeypatch):
  pytest.importorskip("sentencepiece")
  config = lambda name: ml_collections_config(name, 16)
  tokenizer = pipeline.text_tokenizer(config(f"siglip:{FIXTURE}"))
  assert tokenizer.max_length == 16 and tokenizer.vocab_size == 100
  by_file = pipeline.text_tokenizer(config(f"siglip:{FIXTURE}/spiece.model"))
  np.testing.assert_array_equal(by_file(["a cat"])[0], tokenizer(["a cat"])[0])
  with pytest.raises(UsageError, match="spiece.model does not exist"):
    pipeline.text_tokenizer(config(f"siglip:{tmp_path}"))
  with pytest.raises(UsageError, match="known: minilm, bytes, clip:DIR, "
                     "siglip:PATH"):
    pipeline.text_tokenizer(config("sentencepiece"))
  (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": false}')
  shutil.copy(FIXTURE / "spiece.model", tmp_path)
  cased = siglip_tokenizer(tmp_path, 16)
  assert not (cased(["THE"])[0] == tokenizer(["THE"])[0]).all()
  with pytest.raises(TypeError, match="not one string"):
    tokenizer("one string")
  monkeypatch.setitem(__import__("sys").modules, "sentencepiece", None)
  with pytest.raises(UsageError, match="pip install sentencepiece"):
    pipeline.text_tokenizer(config(f"siglip:{FIXTURE}"))


def test_tokenizer_big_vision_style():
  """big_vision's tokenize(eos="sticky", pad_value=1, lower=True):
  punctuation kept, the end id kept when cut."""
  pytest.importorskip("sentencepiece")
  tokenizer = siglip_tokenizer(FIXTURE, 8, style="big_vision")
  ids, mask = tokenizer(["A Cat.", "", "a man riding a wave on a board"])
  assert ids[1].tolist() == [1] * 8 and mask[1].sum() == 1
  assert ids[2, -1] == 1 and mask[2].all()
  assert tokenizer(["a cat"])[0][0, :3].tolist() == [3, 49, 1]
  assert tokenizer(["A CAT"])[0][0, :3].tolist() == [3, 49, 1]
  assert tokenizer(["a cat."])[0][0, 2] == tokenizer.unk_id  # "." unknown
  with pytest.raises(ValueError, match="style must be one of"):
    siglip_tokenizer(FIXTURE, 8, style="t5")


def ml_collections_config(name, length):
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict()
  config.text = ml_collections.ConfigDict(
      {"tokenizer": name, "max_length": length})
  return config


@pytest.mark.skipif(
    not all(importlib.util.find_spec(p)
            for p in ("transformers", "sentencepiece")),
    reason="needs transformers and sentencepiece")
def test_tokenizer_matches_siglip_tokenizer_live():
  from transformers import SiglipTokenizer  # pylint: disable=import-outside-toplevel
  reference = SiglipTokenizer.from_pretrained(FIXTURE)
  ref = tokenizer_reference()
  rng = random.Random(0)
  alphabet = (list("abcdefghijklmnopqrstuvwxyz ABCXYZ.,!?'\"-\t\n\u2581üé🐶<>/s")
              + ["</s>", "<unk>", "  ", "a man", "ing"])
  texts = ref["texts"] + ["".join(rng.choice(alphabet) for _ in range(
      rng.randint(0, 30))) for _ in range(300)]
  tokenizer = siglip_tokenizer(FIXTURE, 16)
  ids, mask = tokenizer(texts)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "This sequence already has </s>"
    for i, text in enumerate(texts):
      want = reference(text, padding="max_length", truncation=True,
                       max_length=16)
      assert ids[i].tolist() == want["input_ids"], text
      assert mask[i].astype(int).tolist() == want["attention_mask"], text
      assert tokenizer.decode(ids[i:i + 1]) == [reference.decode(
          want["input_ids"], skip_special_tokens=True)], text


# ------------------------------------------------------------------- LiT ---


def test_lit_trains_the_text_tower_against_the_locked_siglip_image_tower(
    tmp_path):
  pytest.importorskip("sentencepiece")
  from mmjax.configs import load_config  # pylint: disable=import-outside-toplevel
  config = load_config(f"configs/lit.py:siglip={FIXTURE},smoke")
  assert config.text.tokenizer == f"siglip:{FIXTURE}"
  assert config.text.max_length == 16 and config.objective == "sigmoid"
  params = lit_run.train_lit(config, tmp_path)
  lit_run.assert_image_locked_text_moved(params,
                                         siglip.load_siglip(FIXTURE)[1])


def test_lit_from_a_vit_checkpoint_trains_a_text_tower_from_scratch(
    tmp_path):
  from mmjax.configs import load_config  # pylint: disable=import-outside-toplevel
  from mmjax.models import vit_checkpoints  # pylint: disable=import-outside-toplevel
  vit = FIXTURE.parent / "timm_vit_tiny"
  config = load_config(f"configs/lit.py:vit={vit},smoke")
  assert (config.text.tokenizer, config.image_size) == ("bytes", 32)
  assert dict(config.model.init) == {"tower_image/encoder": f"vit:{vit}"}
  params = lit_run.train_lit(config, tmp_path)
  jax.tree.map(np.testing.assert_array_equal,
               params["tower_image"]["encoder"],
               vit_checkpoints.load_vit(vit)[1])


def test_lit_config_errors_are_usage_errors(tmp_path):
  from mmjax.configs import load_config  # pylint: disable=import-outside-toplevel
  with pytest.raises(UsageError, match="needs clip=DIR or siglip=PATH or "
                     "vit=PATH"):
    load_config("configs/lit.py")
  with pytest.raises(UsageError, match=r"one, got siglip, vit"):
    load_config(f"configs/lit.py:siglip={FIXTURE},vit={FIXTURE}")
  with pytest.raises(UsageError, match="'siglip': .* not a SigLIP checkpoint"):
    load_config(f"configs/lit.py:siglip={tmp_path}")
  with pytest.raises(UsageError, match="has no text tower"):
    load_config(f"configs/lit.py:vit={FIXTURE.parent / 'timm_vit_tiny'},"
                "text=checkpoint")
  _, params = siglip.load_siglip(FIXTURE)
  np.savez(tmp_path / "siglip.npz", **big_vision_names(params))
  with pytest.raises(UsageError, match="ships no spiece.model"):
    load_config(f"configs/lit.py:siglip={tmp_path / 'siglip.npz'}")
  config = load_config(f"configs/lit.py:siglip={tmp_path / 'siglip.npz'},"
                       f"tokenizer=siglip:{FIXTURE}")
  assert config.model.init["tower_image"] == f"siglip:{tmp_path}/siglip.npz"
