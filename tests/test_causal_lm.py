"""GPT-2 checkpoints as TextDecoders (mmjax.models.causal_lm) and the
HuggingFaceTokenizer.

The loader's error paths and the tokeniser's conventions are tested with
checkpoints and vocabularies made here (numpy, safetensors, tokenizers). The
parity tests compare with the reference implementations, a tiny random
`transformers.GPT2LMHeadModel` and `GPT2TokenizerFast`, and are skipped
without torch and transformers (test references only; mmjax never imports
them).
"""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mmjax.data.tokenizer import HuggingFaceTokenizer, gpt2_tokenizer
from mmjax.models.causal_lm import check_fits, first_mismatch, load_gpt2
from mmjax.models.gpt2_config import gpt2_config
from mmjax.models.decoder import TextDecoder

VOCAB, WIDTH, HEADS, LAYERS, POSITIONS = 300, 32, 4, 2, 64
HF_CONFIG = {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": WIDTH,
             "n_head": HEADS, "n_layer": LAYERS, "n_positions": POSITIONS,
             "n_inner": None, "activation_function": "gelu_new",
             "layer_norm_epsilon": 1e-5}


def gpt2_tensors(rng, config=HF_CONFIG, prefix="transformer."):
  """Random tensors with GPT2LMHeadModel's names and shapes (Conv1D [in,
  out]), tied head included."""
  d, v = config["n_embd"], config["vocab_size"]
  inner = config["n_inner"] or 4 * d
  shapes = {"wte.weight": (v, d), "wpe.weight": (config["n_positions"], d),
            "ln_f.weight": (d,), "ln_f.bias": (d,)}
  for i in range(config["n_layer"]):
    shapes.update({
        f"h.{i}.ln_1.weight": (d,), f"h.{i}.ln_1.bias": (d,),
        f"h.{i}.attn.c_attn.weight": (d, 3 * d),
        f"h.{i}.attn.c_attn.bias": (3 * d,),
        f"h.{i}.attn.c_proj.weight": (d, d), f"h.{i}.attn.c_proj.bias": (d,),
        f"h.{i}.ln_2.weight": (d,), f"h.{i}.ln_2.bias": (d,),
        f"h.{i}.mlp.c_fc.weight": (d, inner), f"h.{i}.mlp.c_fc.bias": (inner,),
        f"h.{i}.mlp.c_proj.weight": (inner, d),
        f"h.{i}.mlp.c_proj.bias": (d,)})
  state = {prefix + k: rng.normal(0, 0.1, s).astype(np.float32)
           for k, s in shapes.items()}
  if prefix:
    state["lm_head.weight"] = state[prefix + "wte.weight"]
  return state


def write_checkpoint(directory, state, config=HF_CONFIG):
  # pylint: disable-next=import-outside-toplevel
  from safetensors.numpy import save_file
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  save_file(state, str(directory / "model.safetensors"))
  return directory


@pytest.fixture(name="numpy_checkpoint")
def fixture_numpy_checkpoint(tmp_path):
  state = gpt2_tensors(np.random.default_rng(0))
  return write_checkpoint(tmp_path / "gpt2", state), state


def with_config(directory, destination, **changes):
  """A copy of checkpoint `directory` whose config.json has `changes`."""
  destination.mkdir()
  shutil.copy(directory / "model.safetensors", destination)
  config = json.loads((directory / "config.json").read_text())
  (destination / "config.json").write_text(json.dumps({**config, **changes}))
  return destination


# --- the conversion, without the reference ---------------------------------


def test_load_gpt2_maps_every_tensor(numpy_checkpoint):
  directory, state = numpy_checkpoint
  kwargs, params = load_gpt2(directory)
  assert kwargs == dict(vocab_size=VOCAB, width=WIDTH, num_layers=LAYERS,
                        num_heads=HEADS, mlp_dim=4 * WIDTH,
                        max_length=POSITIONS, positions="learned",
                        layer_norm_epsilon=1e-5, activation="gelu_tanh")
  attention = params["layer_1"]["attention"]
  head_dim = WIDTH // HEADS
  qkv = state["transformer.h.1.attn.c_attn.weight"]
  # Head h of the value is columns 2D + h Dh ... of c_attn.
  np.testing.assert_array_equal(attention["value"]["kernel"][:, 3],
                                qkv[:, 2 * WIDTH + 3 * head_dim:
                                    2 * WIDTH + 4 * head_dim])
  np.testing.assert_array_equal(
      attention["out"]["kernel"][2],
      state["transformer.h.1.attn.c_proj.weight"][2 * head_dim:
                                                  3 * head_dim])
  np.testing.assert_array_equal(params["norm_out"]["scale"],
                                state["transformer.ln_f.weight"])
  logits = TextDecoder(**kwargs).apply({"params": params},
                                       jnp.zeros((1, 3), jnp.int32))
  assert logits.shape == (1, 3, VOCAB)


def test_without_prefix_and_bfloat16(numpy_checkpoint, tmp_path):
  directory, _ = numpy_checkpoint
  _, params = load_gpt2(directory)
  bare = {k: v.astype(ml_dtypes.bfloat16)
          for k, v in gpt2_tensors(np.random.default_rng(0), prefix="").items()}
  # GPT2Model's names, old checkpoints' causal-mask buffers, bfloat16.
  bare["h.0.attn.bias"] = np.ones((1, 1, 4, 4), ml_dtypes.bfloat16)
  _, loaded = load_gpt2(write_checkpoint(tmp_path / "bare", bare))
  assert loaded["layer_0"]["mlp"]["dense_0"]["kernel"].dtype == np.float32
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2),
               params, loaded)


@pytest.mark.parametrize("key,value", [
    ("model_type", "llama"), ("activation_function", "relu"),
    ("scale_attn_by_inverse_layer_idx", True),
    ("reorder_and_upcast_attn", True), ("scale_attn_weights", False),
    ("add_cross_attention", True)])
def test_unsupported_config_names_the_key(key, value):
  with pytest.raises(ValueError, match=key):
    gpt2_config({**HF_CONFIG, key: value})


def test_missing_config_key_is_named():
  with pytest.raises(ValueError, match="n_positions"):
    gpt2_config({k: v for k, v in HF_CONFIG.items() if k != "n_positions"})


def test_activations():
  assert gpt2_config({**HF_CONFIG, "activation_function": "gelu"})[
      "activation"] == "gelu"
  assert gpt2_config({**HF_CONFIG, "activation_function":
                      "gelu_pytorch_tanh", "n_inner": 48})[
                          "activation"] == "gelu_tanh"


def test_untied_head_is_refused(numpy_checkpoint, tmp_path):
  _, state = numpy_checkpoint
  state = {**state, "lm_head.weight": state["lm_head.weight"] + 1}
  directory = write_checkpoint(tmp_path / "untied", state,
                               {**HF_CONFIG, "tie_word_embeddings": False})
  with pytest.raises(ValueError, match="lm_head.weight"):
    load_gpt2(directory)


@pytest.mark.parametrize("changes,culprit", [
    ({"n_positions": 32}, "position_embeddings: expected shape (32, 32), got "
                          "(64, 32)"),
    ({"n_inner": 64}, "layer_0/mlp/dense_0/kernel: expected shape "
                      "(32, 64), got (32, 128)"),
    ({"vocab_size": 301}, "token_embeddings/embedding"),
    ({"n_layer": 3}, "'h.2.ln_1.weight'"),       # missing
    ({"n_layer": 1}, "'h.1.attn.c_attn.bias'"),  # left over
    ({"n_head": 5, "n_embd": 40}, "token_embeddings/embedding: expected "
                                  "shape (300, 40)")])
def test_shape_mismatch_names_the_first_parameter(numpy_checkpoint, tmp_path,
                                                  changes, culprit):
  directory, _ = numpy_checkpoint
  with pytest.raises(ValueError) as error:
    load_gpt2(with_config(directory, tmp_path / "changed", **changes))
  assert culprit in str(error.value)


def test_first_mismatch():
  expected = {"a": jax.ShapeDtypeStruct((2,), jnp.float32),
              "b": {"c": jax.ShapeDtypeStruct((3, 4), jnp.float32)}}
  same = {"a": np.zeros(2), "b": {"c": np.zeros((3, 4))}}
  assert first_mismatch(expected, same) is None
  assert first_mismatch(expected, {"a": np.zeros(2), "b": {
      "c": np.zeros((4, 3))}}) == "b/c: expected shape (3, 4), got (4, 3)"
  assert first_mismatch(expected, {"b": same["b"]}) == (
      "a: missing from the checkpoint")
  assert first_mismatch(expected, {**same, "d": np.zeros(1)}) == (
      "d: not a parameter of the model")
  partial = {"token_embeddings": {"embedding": np.zeros((VOCAB, WIDTH))},
             "position_embeddings": np.zeros((POSITIONS, WIDTH))}
  with pytest.raises(ValueError, match="layer_0: missing"):
    check_fits(partial, gpt2_config(HF_CONFIG))


# --- parity with transformers' GPT2LMHeadModel -----------------------------


def reference_model(tmp_path, activation="gelu_new", n_inner=None):
  """A tiny random GPT2LMHeadModel saved to tmp_path (no download): every
  weight, bias and LayerNorm perturbed, so nothing is zero or one."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.GPT2Config(
      n_layer=LAYERS, n_embd=WIDTH, n_head=HEADS, vocab_size=VOCAB,
      n_positions=POSITIONS, n_inner=n_inner, activation_function=activation,
      bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
  model = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path)
  assert (tmp_path / "model.safetensors").is_file()
  ids = np.random.default_rng(1).integers(0, VOCAB, (2, 16))
  with torch.no_grad():
    logits = model(torch.tensor(ids)).logits.numpy()
  return ids, logits


@pytest.mark.parametrize("activation,n_inner", [("gelu_new", None),
                                                ("gelu", 48)])
def test_logits_match_gpt2lmheadmodel(tmp_path, activation, n_inner):
  ids, reference = reference_model(tmp_path, activation, n_inner)
  kwargs, params = load_gpt2(tmp_path)
  assert kwargs["activation"] == ("gelu_tanh" if activation == "gelu_new"
                                  else "gelu")
  assert kwargs["mlp_dim"] == (n_inner or 4 * WIDTH)
  logits = TextDecoder(**kwargs).apply({"params": params}, ids)
  np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-5)


def test_kv_cached_decoding_matches_gpt2lmheadmodel(tmp_path):
  ids, reference = reference_model(tmp_path)
  kwargs, params = load_gpt2(tmp_path)
  decoder = TextDecoder(**kwargs)
  step = jax.jit(lambda variables, x: decoder.apply(
      variables, x, decode=True, mutable=["cache"]))
  # Prefill five tokens, then one token per call.
  logits, state = step({"params": params}, ids[:, :5])
  steps = [logits]
  for t in range(5, ids.shape[1]):
    logits, state = step({"params": params, **state}, ids[:, t:t + 1])
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), reference, rtol=0,
                             atol=1e-5)


def test_gpt2model_checkpoint_loads_the_same(tmp_path):
  reference_model(tmp_path / "lm")
  transformers = pytest.importorskip("transformers")
  model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "lm")
  model.transformer.save_pretrained(tmp_path / "bare")  # GPT2Model's names
  _, with_prefix = load_gpt2(tmp_path / "lm")
  _, bare = load_gpt2(tmp_path / "bare")
  jax.tree.map(np.testing.assert_array_equal, with_prefix, bare)


# --- HuggingFaceTokenizer ----------------------------------------------------

CORPUS = ["The quick brown fox jumps over the lazy dog.",
          "Hello, world! Héllo wörld, naïve café 🙂 and 日本語.",
          "A cat sat on the mat; the dog did not!!!"] * 3
SENTENCES = ["Hello, world!", "🙂 naïve café", "", "a", "!!!",
             "  two  spaces\n\tand a tab", "日本語のテキスト",
             "The quick brown fox jumps over the lazy dog. " * 4]
LENGTH = 24


@pytest.fixture(name="bpe", scope="module")
def fixture_bpe(tmp_path_factory):
  """A byte-level BPE trained here, with GPT-2's end token last and "!" as
  id 0 (as in GPT-2): (directory with tokenizer.json, vocab.json,
  merges.txt)."""
  tokenizers = pytest.importorskip("tokenizers")
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1,
                          special_tokens=[], show_progress=False)
  bpe.add_special_tokens(["<|endoftext|>"])
  directory = tmp_path_factory.mktemp("bpe")
  bpe.save(str(directory / "tokenizer.json"))
  bpe.save_model(str(directory))
  return directory


def test_tokenizer_padding_convention(bpe):
  tokenizer = HuggingFaceTokenizer(bpe / "tokenizer.json", 8)
  eos = tokenizer.eos_id
  assert eos == tokenizer.vocab_size - 1 and tokenizer.pad_id == eos
  ids, mask = tokenizer(["!", "", "fox"])
  assert ids.dtype == np.int32 and ids.shape == mask.shape == (3, 8)
  assert mask.dtype == bool
  np.testing.assert_array_equal(ids[0], [0] + [eos] * 7)  # "!" is id 0
  np.testing.assert_array_equal(mask[0], [True, True] + [False] * 6)
  np.testing.assert_array_equal(ids[1], [eos] * 8)
  np.testing.assert_array_equal(mask[1], [True] + [False] * 7)
  assert tokenizer.decode(ids) == ["!", "", "fox"]
  # Whatever follows the first end token is ignored; no end token: all.
  row = np.array([[ids[2, 0], ids[2, 1], eos, 5, 6], [0, 0, 0, 0, 0]])
  assert tokenizer.decode(row) == ["fox", "!!!!!"]
  zero = HuggingFaceTokenizer(bpe / "tokenizer.json", 4, pad_id=0)
  ids, mask = zero(["!"])
  np.testing.assert_array_equal(ids, [[0, eos, 0, 0]])
  np.testing.assert_array_equal(mask, [[True, True, False, False]])
  shifted = gpt2_tokenizer(bpe, 5)  # mmjax's convention: ids + 1, pad 0
  ids, mask = shifted(["!", "fox"])
  assert (shifted.eos_id, shifted.pad_id) == (eos + 1, 0)
  assert shifted.vocab_size == tokenizer.vocab_size + 1
  np.testing.assert_array_equal(ids[0], [1, eos + 1, 0, 0, 0])
  fox, fox_mask = tokenizer(["fox"])
  n = int(fox_mask.sum())
  np.testing.assert_array_equal(ids[1], np.pad(fox[0, :n] + 1, (0, 5 - n)))
  assert shifted.decode(ids) == ["!", "fox"]
  assert shifted.decode(np.array([[1, 1, 0]])) == ["!!"]
  ids, mask = HuggingFaceTokenizer(bpe / "tokenizer.json", 1)(["fox"])
  assert ids.tolist() == [[eos]] and mask.all()
  with pytest.raises(ValueError, match="<eos>"):
    HuggingFaceTokenizer(bpe / "tokenizer.json", 8, eos_token="<eos>")
  with pytest.raises(TypeError):
    tokenizer("one string")


def test_tokenizer_matches_gpt2tokenizerfast(bpe):
  transformers = pytest.importorskip("transformers")
  vocab = json.loads((bpe / "vocab.json").read_text())
  merges = [tuple(line.split(" ")) for line in
            (bpe / "merges.txt").read_text().splitlines()[1:] if line]
  # Built from vocab and merges only: GPT-2's pre-tokeniser and decoder.
  reference = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
  tokenizer = HuggingFaceTokenizer(bpe / "tokenizer.json", LENGTH)
  assert tokenizer.eos_id == reference.eos_token_id
  assert tokenizer.vocab_size == len(reference)
  ids, mask = tokenizer(SENTENCES)
  for text, row, valid in zip(SENTENCES, ids, mask):
    expected = reference(text)["input_ids"][:LENGTH - 1] + [tokenizer.eos_id]
    assert row[:len(expected)].tolist() == expected, text
    assert (row[len(expected):] == tokenizer.pad_id).all()
    assert valid.tolist() == [True] * len(expected) + [False] * (
        LENGTH - len(expected))
  decoded = tokenizer.decode(ids)
  assert decoded[:-1] == SENTENCES[:-1]  # round trip
  assert len(reference(SENTENCES[-1])["input_ids"]) > LENGTH  # truncated
  assert decoded[-1] == reference.decode(ids[-1, :LENGTH - 1].tolist())
  assert SENTENCES[-1].startswith(decoded[-1])


# --- GPT-2 as a generative model's decoder, through the trainer -------------


def test_shifted_gpt2_gives_gpt2s_logits_one_column_up(numpy_checkpoint):
  directory, _ = numpy_checkpoint
  kwargs, params = load_gpt2(directory)
  shifted_kwargs, shifted = load_gpt2(directory, id_offset=1)
  assert shifted_kwargs == {**kwargs, "vocab_size": VOCAB + 1}
  ids = np.random.default_rng(1).integers(0, VOCAB, (2, 7))
  logits = TextDecoder(**kwargs).apply({"params": params}, ids)
  moved = TextDecoder(**shifted_kwargs).apply({"params": shifted}, ids + 1)
  np.testing.assert_allclose(moved[..., 1:], logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(moved[..., 0], 0.0)  # padding's zero row


def test_flamingo_captioner_on_a_frozen_gpt2_through_the_trainer(
    tmp_path, bpe, frozen_lm_flamingo):
  # A GPT-2 checkpoint directory: the BPE above and random GPT-2 tensors of
  # its vocabulary.
  vocab = HuggingFaceTokenizer(bpe / "tokenizer.json").vocab_size
  hf_config = {**HF_CONFIG, "vocab_size": vocab}
  directory = write_checkpoint(
      tmp_path / "gpt2", gpt2_tensors(np.random.default_rng(2), hf_config),
      hf_config)
  shutil.copy(bpe / "tokenizer.json", directory)
  config = frozen_lm_flamingo(f"gpt2={directory}",
                              load_gpt2(directory, id_offset=1)[1], LAYERS)
  assert config.model.bos_id == vocab  # <|endoftext|> (id vocab - 1) + 1
