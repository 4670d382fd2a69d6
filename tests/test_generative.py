"""The text decoder, its KV cache and the generative models' conditioning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import objectives
from mmjax.models import factory
from mmjax.models.decoder import TextDecoder, attention_mask, rotary
from mmjax.models.generative import GenerativeModel, generate

VOCAB = 23
DECODER = dict(vocab_size=VOCAB, width=16, num_layers=3, num_heads=2,
               mlp_dim=32, max_length=128)
IMAGE = {"name": "lenet", "features": 4, "extra_layers": 1}  # 7x7 tokens


def make_model(conditioning: str, modalities=("image",), registers=0,
               **decoder):
  return factory.build_generative(
      modalities=modalities, encoders={"image": IMAGE, "audio": IMAGE},
      decoder={**DECODER, **decoder}, conditioning=conditioning,
      num_latents=4, xattn_every=2, num_heads=2, registers=registers)


def make_batch(size: int = 3, seed: int = 0, prompt: bool = True) -> dict:
  rng = np.random.default_rng(seed)
  text = rng.integers(2, VOCAB, (size, 7)).astype(np.int32)
  text[0, 4:] = [1, 0, 0]  # end token, then padding
  batch = {"image": rng.random((size, 28, 28, 1), np.float32),
           "audio": rng.random((size, 28, 28, 1), np.float32),
           "mask/image": np.array([True, True, False][:size]),
           "mask/audio": np.ones(size, bool), "text": text}
  if prompt:
    p = rng.integers(2, VOCAB, (size, 4)).astype(np.int32)
    p[1, 2:] = 0  # a shorter prompt, padded
    batch["prompt"] = p
  return {k: jnp.asarray(v) for k, v in batch.items()}


def init(model, batch):
  return model.init(jax.random.PRNGKey(0), batch)


def test_attention_mask_is_causal_with_a_bidirectional_prefix():
  mask = np.asarray(attention_mask(jnp.arange(5), jnp.arange(5),
                                   jnp.ones((1, 5), bool), 2))[0, 0]
  expected = np.tril(np.ones((5, 5), bool))
  expected[:2, :2] = True  # the prefix sees itself both ways
  np.testing.assert_array_equal(mask, expected)


def test_rotary_matches_a_numpy_reference_and_keeps_relative_positions():
  x = np.random.default_rng(0).normal(size=(1, 4, 1, 8)).astype(np.float32)
  positions = np.array([0, 3, 5, 9])
  half = 4
  freq = 10000.0 ** (-np.arange(half) * 2 / 8)
  angle = positions[:, None] * freq
  x1, x2 = x[..., :half], x[..., half:]
  cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
  expected = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  np.testing.assert_allclose(rotary(jnp.asarray(x), jnp.asarray(positions)),
                             expected, atol=1e-5)
  # q.k depends only on the offset between the two positions.
  q, k = jnp.asarray(x[:, :1]), jnp.asarray(x[:, 1:2])
  dot = lambda a, b: float(jnp.sum(rotary(q, jnp.array([a])) *
                                   rotary(k, jnp.array([b]))))
  assert dot(2, 7) == pytest.approx(dot(10, 15), rel=1e-4)


@pytest.mark.parametrize("conditioning,positions,registers", [
    ("prefix", "learned", 0), ("prefix", "rotary", 0), ("prefix", "learned", 2),
    ("cross_attention", "learned", 0), ("cross_attention", "learned", 2),
    ("flamingo", "rotary", 0)])
def test_cached_decoding_equals_full_recomputation(conditioning, positions,
                                                   registers):
  model = make_model(conditioning, positions=positions, registers=registers)
  batch = make_batch()
  variables = init(model, batch)
  if conditioning == "flamingo":  # open the gates, or nothing is tested
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.5 if "alpha" in jax.tree_util.keystr(p) else x,
        variables)
  full = jax.jit(model.apply)(variables, batch)["logits"]  # teacher forcing
  media, valid = model.apply(variables, batch, method=model.encode)
  tokens = jnp.concatenate([jnp.ones((3, 1), jnp.int32),
                            batch["text"][:, :-1]], 1)
  # Prefill the prompt and two tokens, then one token per call.
  logits, state = model.apply(variables, tokens[:, :2], media, valid,
                              prompt=batch["prompt"], decode=True,
                              method=model.decode, mutable=["cache"])
  steps = [logits]
  length = (media.shape[1] if conditioning == "prefix" else 0) + 4
  step = jax.jit(lambda v, t: model.apply(
      v, t, media, valid, start=False, full_attention_length=length,
      decode=True, method=model.decode, mutable=["cache"]))
  for t in range(2, tokens.shape[1]):
    logits, state = step({**variables, **state}, tokens[:, t:t + 1])
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5)


def test_greedy_generation_equals_argmax_over_full_recomputation():
  model = make_model("prefix")
  batch = make_batch()
  variables = init(model, batch)
  tokens = jax.jit(lambda v, b: generate(model, v, b, max_new_tokens=6,
                                         eos_id=1))(variables, batch)
  # Reference: grow each sequence and recompute every logit from scratch.
  text = jnp.zeros((3, 0), jnp.int32)
  reference = []
  for _ in range(6):
    probe = {**batch, "text": jnp.concatenate(
        [text, jnp.zeros((3, 1), jnp.int32)], 1)}
    nxt = jnp.argmax(model.apply(variables, probe)["logits"][:, -1], -1)
    reference.append(nxt)
    text = jnp.concatenate([text, nxt[:, None].astype(jnp.int32)], 1)
  reference = np.stack(reference, 1)
  for row, ref in zip(np.asarray(tokens), reference):
    end = list(ref).index(1) + 1 if 1 in ref else len(ref)
    np.testing.assert_array_equal(row[:end], ref[:end])
    assert (row[end:] == 0).all()


def test_flamingo_at_initialisation_equals_its_frozen_language_model():
  """Flamingo's tanh gates start at 0: with the LM's parameters loaded,
  the logits are the text-only LM's exactly (Alayrac et al. 2022)."""
  batch = make_batch()
  lm = make_model("prefix", modalities=())
  lm_vars = init(lm, batch)
  flamingo = make_model("flamingo", modalities=("image", "audio"))
  variables = init(flamingo, batch)
  params = {**variables["params"], "decoder": lm_vars["params"]["decoder"]}
  assert set(variables["params"]["decoder"]) == set(params["decoder"])
  np.testing.assert_array_equal(
      flamingo.apply({**variables, "params": params}, batch)["logits"],
      lm.apply(lm_vars, batch)["logits"])


def test_prefix_conditioning_ignores_missing_media_and_prompt_padding():
  model = make_model("prefix", modalities=("image", "audio"))
  batch = make_batch()
  variables = init(model, batch)
  logits = model.apply(variables, batch)["logits"]
  changed = dict(batch)
  changed["image"] = batch["image"].at[2].set(7.0)  # example 2 lacks it
  changed["prompt"] = batch["prompt"].at[1, 2:].set(0)  # already padding
  np.testing.assert_allclose(model.apply(variables, changed)["logits"],
                             logits, atol=1e-6)
  present = dict(batch)
  present["image"] = batch["image"].at[0].set(7.0)  # example 0 has it
  assert not np.allclose(model.apply(variables, present)["logits"][0],
                         logits[0])


@pytest.mark.parametrize("conditioning", ["prefix", "cross_attention"])
def test_registers_follow_the_media_and_stay_valid_without_them(conditioning):
  model = make_model(conditioning, registers=3)
  batch = make_batch()
  variables = init(model, batch)
  registers = variables["params"]["register_tokens"]
  assert registers.shape == (3, DECODER["width"])
  media, valid = model.apply(variables, batch, method=model.encode)
  assert media.shape == (3, 49 + 3, DECODER["width"])
  np.testing.assert_array_equal(media[:, 49:],
                                np.broadcast_to(registers, (3, 3, 16)))
  # Example 2 has no image: its image tokens are invalid, its registers not.
  np.testing.assert_array_equal(valid[:, 49:], True)
  np.testing.assert_array_equal(valid[:, :49].all(1), [True, True, False])
  # The decoder attends to them, even where every modality is missing.
  moved = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 1.0 if "register" in jax.tree_util.keystr(p) else x,
      variables)
  logits = model.apply(variables, batch)["logits"]
  assert not np.allclose(model.apply(moved, batch)["logits"][2], logits[2])


def test_registers_need_media_tokens_that_the_decoder_reads_directly():
  batch = make_batch()
  for model in (make_model("flamingo", registers=1),
                make_model("prefix", modalities=(), registers=1)):
    with pytest.raises(ValueError, match="registers need media"):
      init(model, batch)


def test_text_logits_are_causal():
  model = make_model("cross_attention")
  batch = make_batch()
  variables = init(model, batch)
  logits = model.apply(variables, batch)["logits"]
  later = {**batch, "text": batch["text"].at[:, 4:].set(5)}
  changed = model.apply(variables, later)["logits"]
  # The input is [bos] + text[:-1]: positions 0..4 see text[:4] only.
  np.testing.assert_allclose(changed[:, :5], logits[:, :5], atol=1e-6)
  assert not np.allclose(changed[:, 5:], logits[:, 5:])


def test_captioning_objective_is_the_token_mean_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 6)).astype(np.float32)
  text = np.array([[3, 4, 1, 0], [2, 1, 0, 0]], np.int32)
  loss, metrics = objectives.captioning({"logits": jnp.asarray(logits)},
                                        {"text": jnp.asarray(text)})
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = [-log_p[b, t, text[b, t]] for b in range(2) for t in range(4)
            if text[b, t]]
  assert float(loss) == pytest.approx(np.mean(picked), rel=1e-5)
  assert float(metrics["perplexity"]) == pytest.approx(np.exp(np.mean(picked)),
                                                       rel=1e-5)


def test_bfloat16_decoder_keeps_float32_parameters_and_logits():
  model = factory.build_generative(
      modalities=("image",), encoders={"image": IMAGE}, decoder=DECODER,
      dtype="bfloat16")
  batch = make_batch()
  variables = init(model, batch)
  assert {np.dtype(x.dtype) for x in jax.tree.leaves(variables)} == {
      np.dtype(np.float32)}
  assert model.apply(variables, batch)["logits"].dtype == jnp.float32
  lowered = jax.jit(lambda v: model.apply(v, batch)).lower(variables).as_text()
  assert "bf16" in lowered


def test_decoder_gradients_reach_every_parameter():
  model = make_model("flamingo")
  batch = make_batch()
  variables = init(model, batch)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.5 if "alpha" in jax.tree_util.keystr(p) else x,
      variables["params"])
  grads = jax.jit(jax.grad(lambda p: objectives.captioning(model.apply(
      {**variables, "params": p}, batch, train=True,
      mutable=["batch_stats"])[0], batch)[0]))(params)
  zero = [jax.tree_util.keystr(p) for p, g in
          jax.tree_util.tree_flatten_with_path(grads)[0]
          if not np.any(np.asarray(g))]
  assert not zero
  assert optax.tree.norm(grads) > 0


def test_decoder_rejects_a_sequence_longer_than_its_positions():
  decoder = TextDecoder(**{**DECODER, "max_length": 4})
  with pytest.raises(ValueError, match="max_length=4"):
    decoder.init(jax.random.PRNGKey(0), jnp.zeros((1, 5), jnp.int32))


def test_weights_of_another_run_load_by_path(tmp_path):
  """model.init {"decoder": "run:<workdir>"}: the subtree of that run's
  latest checkpoint, as stored (Flamingo's frozen LM); "run:<workdir>#a/b"
  its subtree at a/b."""
  from mmjax import checkpoint, experiment
  from mmjax.errors import UsageError
  params = {"decoder": {"norm_out": {"scale": np.arange(3.0)}},
            "other": {"w": np.ones(2)}}
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(7, {"params": params, "step": np.int32(7)}, {"position": 1})
  ckpt.close()
  loaded = experiment.pretrained_weights("decoder", f"run:{tmp_path}")
  np.testing.assert_array_equal(loaded["norm_out"]["scale"], np.arange(3.0))
  with pytest.raises(UsageError, match="no parameters at 'encoder'"):
    experiment.pretrained_weights("encoder", f"run:{tmp_path}")
  # "#<path>": the subtree at another path (a classifier's encoder as a
  # patch encoder's LeNet).
  moved = experiment.pretrained_weights("encoder_image/patch_encoder",
                                        f"run:{tmp_path}#other")
  np.testing.assert_array_equal(moved["w"], np.ones(2))
  with pytest.raises(UsageError, match="no parameters at 'missing'"):
    experiment.pretrained_weights("decoder", f"run:{tmp_path}#missing")
  with pytest.raises(UsageError, match="no checkpoints"):
    experiment.pretrained_weights("decoder", f"run:{tmp_path / 'none'}")
