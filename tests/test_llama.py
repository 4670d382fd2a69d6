"""Llama-family checkpoints as TextDecoders (mmjax.models.causal_lm.load_llama,
mmjax.models.llama_config).

The config reader's and converter's error paths are tested with
checkpoints written here (numpy, safetensors). The parity tests compare
with tiny random `transformers.LlamaForCausalLM` models built locally from
a config (no download) and are skipped without torch and transformers
(test references only; mmjax never imports them).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.causal_lm import load_llama
from mmjax.models.decoder import TextDecoder, rotary_frequencies
from mmjax.models.llama_config import llama_config, special_tokens

VOCAB, WIDTH, HEADS, KV_HEADS, LAYERS, FFN = 300, 32, 4, 2, 2, 48
HF_CONFIG = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": WIDTH,
             "intermediate_size": FFN, "num_hidden_layers": LAYERS,
             "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
             "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
             "rope_theta": 500000.0, "hidden_act": "silu",
             "tie_word_embeddings": False, "bos_token_id": 1,
             "eos_token_id": 2}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def llama_tensors(rng, config=HF_CONFIG):
  """Random tensors with LlamaForCausalLM's names and torch shapes."""
  d, f, v = config["hidden_size"], config["intermediate_size"], (
      config["vocab_size"])
  dh = d // config["num_attention_heads"]
  kv = config["num_key_value_heads"] * dh
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
            "lm_head.weight": (v, d)}
  for i in range(config["num_hidden_layers"]):
    layer = f"model.layers.{i}"
    shapes.update({
        f"{layer}.input_layernorm.weight": (d,),
        f"{layer}.post_attention_layernorm.weight": (d,),
        f"{layer}.self_attn.q_proj.weight": (d, d),
        f"{layer}.self_attn.k_proj.weight": (kv, d),
        f"{layer}.self_attn.v_proj.weight": (kv, d),
        f"{layer}.self_attn.o_proj.weight": (d, d),
        f"{layer}.mlp.gate_proj.weight": (f, d),
        f"{layer}.mlp.up_proj.weight": (f, d),
        f"{layer}.mlp.down_proj.weight": (d, f)})
  return {k: rng.normal(0, 0.1, s).astype(np.float32)
          for k, s in shapes.items()}


def write_checkpoint(directory, state, config=HF_CONFIG):
  # pylint: disable-next=import-outside-toplevel
  from safetensors.numpy import save_file
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  save_file(state, str(directory / "model.safetensors"))
  return directory


# --- the conversion, without the reference ---------------------------------


def test_load_llama_maps_every_tensor(tmp_path):
  state = llama_tensors(np.random.default_rng(0))
  kwargs, params = load_llama(write_checkpoint(tmp_path / "llama", state))
  assert kwargs == dict(
      vocab_size=VOCAB, width=WIDTH, num_layers=LAYERS, num_heads=HEADS,
      num_kv_heads=KV_HEADS, head_dim=WIDTH // HEADS, mlp_dim=FFN,
      max_length=64, positions="rotary", rotary_base=500000.0,
      rotary_llama3=None, layer_norm_epsilon=1e-5, activation="silu",
      norm="rms", gated_mlp=True, attention_bias=False, mlp_bias=False,
      tie_embeddings=False)
  head_dim = WIDTH // HEADS
  attention = params["layer_1"]["attention"]
  assert attention["key"]["kernel"].shape == (WIDTH, KV_HEADS, head_dim)
  # Key head 1 is rows Dh .. 2 Dh of k_proj (torch [out, in]).
  np.testing.assert_array_equal(
      attention["key"]["kernel"][:, 1],
      state["model.layers.1.self_attn.k_proj.weight"][head_dim:
                                                      2 * head_dim].T)
  np.testing.assert_array_equal(
      params["layer_0"]["mlp"]["dense_up"]["kernel"],
      state["model.layers.0.mlp.up_proj.weight"].T)
  np.testing.assert_array_equal(params["lm_head"]["kernel"],
                                state["lm_head.weight"].T)
  shifted_kwargs, shifted = load_llama(tmp_path / "llama", id_offset=1)
  assert shifted_kwargs["vocab_size"] == VOCAB + 1
  ids = np.random.default_rng(1).integers(0, VOCAB, (2, 7))
  logits = TextDecoder(**kwargs).apply({"params": params}, ids)
  moved = TextDecoder(**shifted_kwargs).apply({"params": shifted}, ids + 1)
  np.testing.assert_allclose(moved[..., 1:], logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(moved[..., 0], 0.0)


@pytest.mark.parametrize("changes,culprit", [
    ({"model_type": "mistral"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "low_freq_factor")])
def test_unsupported_config_names_the_key(changes, culprit):
  with pytest.raises(ValueError, match=culprit):
    llama_config({**HF_CONFIG, **changes})
  with pytest.raises(ValueError, match="intermediate_size"):
    llama_config({k: v for k, v in HF_CONFIG.items()
                  if k != "intermediate_size"})


def test_rope_parameters_of_either_transformers_version():
  old = llama_config({**HF_CONFIG, "rope_scaling": LLAMA3})
  new = llama_config({**{k: v for k, v in HF_CONFIG.items()
                         if k != "rope_theta"},
                      "rope_parameters": {**LLAMA3, "rope_theta": 500000.0}})
  assert old == new and old["rotary_llama3"] == (8.0, 1.0, 4.0, 16)
  assert old["rotary_base"] == 500000.0


def test_llama3_frequencies_follow_the_formula():
  base = rotary_frequencies(64, 500000.0)
  scaled = rotary_frequencies(64, 500000.0, (8.0, 1.0, 4.0, 8192))
  wavelength = 2 * np.pi / base
  high = wavelength < 8192 / 4        # kept
  low = wavelength > 8192 / 1         # divided by the factor
  np.testing.assert_array_equal(scaled[high], base[high])
  np.testing.assert_allclose(scaled[low], base[low] / 8, rtol=1e-6)
  between = ~high & ~low
  assert between.any()
  s = (8192 / wavelength[between] - 1) / 3
  np.testing.assert_allclose(scaled[between],
                             (1 - s) * base[between] / 8 + s * base[between],
                             rtol=1e-6)


@pytest.mark.parametrize("change,culprit", [
    ("left_over", "'layers.2.input_layernorm.weight'"),
    ("missing", "'layers.1.mlp.down_proj.weight'"),
    ("tied_differs", "lm_head.weight"),
    ("bias", "'layers.0.self_attn.q_proj.bias'")])
def test_checkpoint_errors_name_the_tensor(tmp_path, change, culprit):
  rng = np.random.default_rng(0)
  config = dict(HF_CONFIG)
  if change == "left_over":
    state = llama_tensors(rng, {**config, "num_hidden_layers": 3})
  else:
    state = llama_tensors(rng)
  if change == "missing":
    del state["model.layers.1.mlp.down_proj.weight"]
  if change == "tied_differs":
    config["tie_word_embeddings"] = True
  if change == "bias":
    state["model.layers.0.self_attn.q_proj.bias"] = np.zeros(WIDTH,
                                                             np.float32)
  with pytest.raises(ValueError, match=culprit):
    load_llama(write_checkpoint(tmp_path / "llama", state, config))


def test_special_tokens(tmp_path):
  directory = write_checkpoint(tmp_path / "llama",
                               llama_tensors(np.random.default_rng(0)))
  spec = {"added_tokens": [{"id": 1, "content": "<s>"},
                           {"id": 2, "content": "</s>"}],
          "model": {"type": "BPE", "vocab": {"a": 0, "<s>": 1, "</s>": 2}}}
  (directory / "tokenizer.json").write_text(json.dumps(spec))
  assert special_tokens(directory) == ("<s>", "</s>")
  config = {**HF_CONFIG, "eos_token_id": [7, 2]}
  (directory / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="eos_token_id"):
    special_tokens(directory)


# --- parity with transformers' LlamaForCausalLM ----------------------------


def reference_model(tmp_path, **changes):
  """A tiny random LlamaForCausalLM saved to tmp_path (no download), every
  weight and RMSNorm scale perturbed so that nothing is zero or one;
  (ids [2, 16], its logits)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  keys = ("vocab_size", "hidden_size", "intermediate_size",
          "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "max_position_embeddings", "rms_norm_eps", "rope_theta",
          "tie_word_embeddings", "bos_token_id", "eos_token_id")
  config = transformers.LlamaConfig(**{**{k: HF_CONFIG[k] for k in keys},
                                      **changes})
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path)
  ids = np.random.default_rng(1).integers(0, VOCAB, (2, 16))
  with torch.no_grad():
    logits = model(torch.tensor(ids)).logits.numpy()
  return ids, logits


@pytest.mark.parametrize("changes", [
    {},                                                   # GQA, untied
    {"num_key_value_heads": HEADS, "tie_word_embeddings": True,
     "attention_bias": True, "mlp_bias": True},
    {"rope_scaling": LLAMA3, "head_dim": 16}],
    ids=["gqa-untied", "tied-biases", "llama3-rope-head-dim"])
def test_logits_match_llamaforcausallm(tmp_path, changes):
  ids, reference = reference_model(tmp_path, **changes)
  kwargs, params = load_llama(tmp_path)
  logits = TextDecoder(**kwargs).apply({"params": params}, ids)
  np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-5)


def test_kv_cached_decoding_matches_llamaforcausallm(tmp_path):
  ids, reference = reference_model(tmp_path)
  kwargs, params = load_llama(tmp_path)
  decoder = TextDecoder(**kwargs)
  step = jax.jit(lambda variables, x: decoder.apply(
      variables, x, decode=True, mutable=["cache"]))
  logits, state = step({"params": params}, ids[:, :5])   # prefill
  cached = state["cache"]["layer_0"]["attention"]["cached_key"]
  assert cached.shape[2] == KV_HEADS                     # G heads cached
  steps = [logits]
  for t in range(5, ids.shape[1]):
    logits, state = step({"params": params, **state}, ids[:, t:t + 1])
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), reference, rtol=0,
                             atol=1e-5)


# --- a Llama as a generative model's decoder, through the trainer ----------


@pytest.fixture(name="llama_dir")
def fixture_llama_dir(tmp_path):
  """A Llama checkpoint directory: a byte-level BPE trained here with
  "<s>" and "</s>" (ids 0 and 1) and random Llama tensors of its
  vocabulary."""
  tokenizers = pytest.importorskip("tokenizers")
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(["a cat sat on the mat", "two dogs ran home"] * 3,
                          vocab_size=300, min_frequency=1,
                          special_tokens=["<s>", "</s>"], show_progress=False)
  directory = tmp_path / "llama"
  vocab = bpe.get_vocab_size()
  config = {**HF_CONFIG, "vocab_size": vocab, "bos_token_id": 0,
            "eos_token_id": 1, "max_position_embeddings": 4096}
  write_checkpoint(directory, llama_tensors(np.random.default_rng(2), config),
                   config)
  bpe.save(str(directory / "tokenizer.json"))
  return directory


def test_llama_tokenizer_convention(llama_dir):
  # pylint: disable-next=import-outside-toplevel
  from mmjax.data.tokenizer import HuggingFaceTokenizer, llama_tokenizer
  tokenizer = llama_tokenizer(llama_dir, 12)
  plain = HuggingFaceTokenizer(llama_dir / "tokenizer.json", 12,
                               eos_token="</s>")
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)
  ids, mask = tokenizer(["a cat sat", ""])
  text, text_mask = plain(["a cat sat"])
  n = int(text_mask.sum()) - 1                    # without its end token
  np.testing.assert_array_equal(
      ids[0], np.pad([1, *(text[0, :n] + 1), 2], (0, 12 - n - 2)))
  np.testing.assert_array_equal(ids[1], [1, 2] + [0] * 10)
  assert mask[0].sum() == n + 2
  assert tokenizer.decode(ids) == ["a cat sat", ""]


def test_flamingo_captioner_on_a_frozen_llama_through_the_trainer(
    llama_dir, frozen_lm_flamingo):
  config = frozen_lm_flamingo(f"llama={llama_dir}",
                              load_llama(llama_dir, id_offset=1)[1], LAYERS)
  assert config.model.bos_id == 1          # <s> (id 0) + 1
  assert config.model.decoder.max_length == 160
  assert config.text.tokenizer == f"llama:{llama_dir}"
