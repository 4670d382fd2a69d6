"""CoCa (mmjax.models.coca): outputs, objective, padding, causality, cached
decoding, generation, gradients and gradient accumulation."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax import accumulate, objectives
from mmjax.models.coca import CoCa, build_coca, coca_from_config, coca_objective
from mmjax.models.generative import generate

VOCAB = 23
IMAGE = {"name": "lenet", "features": 4, "extra_layers": 1}  # 4x4 tokens
SIZES = dict(vocab_size=VOCAB, width=16, unimodal_layers=1,
             multimodal_layers=1, num_heads=2, mlp_dim=32, max_length=16,
             embed_dim=8, num_queries=4, bos_id=2)


def make_batch(size: int = 3, seed: int = 0, length: int = 7) -> dict:
  rng = np.random.default_rng(seed)
  text = rng.integers(3, VOCAB, (size, length)).astype(np.int32)
  text[0, 4:] = [1] + [0] * (length - 5)  # end token, then padding
  text[1, 6:] = [1] + [0] * (length - 7)
  return {"image": jnp.asarray(rng.random((size, 16, 16, 1), np.float32)),
          "text": jnp.asarray(text)}


@pytest.fixture(scope="module")
def setup():
  model = build_coca(image_encoder=IMAGE, **SIZES)
  batch = make_batch()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
  return model, variables, batch, jax.jit(model.apply)


def test_outputs_and_parameters(setup):
  model, variables, batch, apply = setup
  out = apply(variables, batch)
  assert out["logits"].shape == (3, 7, VOCAB)
  for m in ("image", "text"):
    z = out[f"embedding/{m}"]
    assert z.shape == (3, 8) and z.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, atol=1e-5)
  assert float(out["log_scale"]) == pytest.approx(math.log(1 / 0.07))
  assert float(out["bias"]) == 0.0
  params = variables["params"]
  assert set(params) == {"encoder_image", "caption_pooler",
                         "contrastive_pooler", "project_image",
                         "project_text", "text_decoder", "log_scale"}
  assert set(params["text_decoder"]) == {
      "token_embeddings", "position_embeddings", "cls_token", "unimodal_0",
      "multimodal_0", "norm_cls", "norm_out"}
  assert "cross_attention" not in params["text_decoder"]["unimodal_0"]
  assert "cross_attention" in params["text_decoder"]["multimodal_0"]
  assert params["caption_pooler"]["queries"].shape == (4, 16)
  assert params["contrastive_pooler"]["queries"].shape == (1, 16)
  media, valid = jax.jit(lambda v, b: model.apply(v, b, method=model.encode))(
      variables, batch)
  assert media.shape == (3, 4, 16) and bool(valid.all())
  # The config route builds the same model.
  config = ml_collections.ConfigDict({"model": {"encoders": {"image": IMAGE},
                                                **SIZES}})
  assert coca_from_config(config) == model
  assert isinstance(model, CoCa) and model.decoder.max_length == 16


def test_objective_terms_equal_the_mmjax_objectives_exactly(setup):
  _, variables, batch, apply = setup
  out = apply(variables, batch)
  value_and_grad = lambda f: jax.value_and_grad(
      lambda o: f(o, batch)[0])(out)
  cases = [(coca_objective(caption_weight=0.0),
            objectives.contrastive("softmax")),
           (coca_objective(caption_weight=1.0, contrastive_weight=0.0),
            objectives.captioning)]
  for coca, reference in cases:
    assert objectives.whole_batch(coca)
    (loss, grads), (ref_loss, ref_grads) = (value_and_grad(coca),
                                            value_and_grad(reference))
    assert float(loss) == float(ref_loss)
    for key in out:
      np.testing.assert_array_equal(grads[key], ref_grads[key])
  loss, metrics = coca_objective()(out, batch)  # the paper's weights
  con, _ = objectives.contrastive("softmax")(out, batch)
  cap, _ = objectives.captioning(out, batch)
  assert float(loss) == pytest.approx(float(con + 2 * cap), rel=1e-6)
  assert float(metrics["contrastive/loss"]) == float(con)
  assert float(metrics["caption/loss"]) == float(cap)
  with pytest.raises(ValueError, match="nonzero"):
    coca_objective(0, 0)


def test_text_embedding_ignores_the_padding_after_the_text(setup):
  _, variables, batch, apply = setup
  out = apply(variables, batch)
  longer = {**batch, "text": jnp.pad(batch["text"], ((0, 0), (0, 5)))}
  padded = apply(variables, longer)
  # Row 0 ends early, row 1 at the last position, row 2 fills all 7 (no end
  # token): the CLS reads [bos] + text, so no row depends on the padding.
  np.testing.assert_allclose(padded["embedding/text"], out["embedding/text"],
                             atol=1e-5)
  np.testing.assert_allclose(padded["logits"][:, :7], out["logits"],
                             atol=1e-5)
  # ... but on the text's last token (the last target, read by the CLS only).
  last = apply(variables, {**batch, "text": batch["text"].at[2, 6].set(4)})
  np.testing.assert_array_equal(last["logits"], out["logits"])
  assert not np.allclose(last["embedding/text"][2], out["embedding/text"][2],
                         atol=1e-4)
  np.testing.assert_array_equal(padded["embedding/image"],
                                out["embedding/image"])


def test_logits_are_causal_and_the_cls_reads_the_whole_text(setup):
  _, variables, batch, apply = setup
  out = apply(variables, batch)
  later = {**batch, "text": batch["text"].at[:, 4:].set(5)}
  changed = apply(variables, later)
  # The input is [bos] + text[:-1]: positions 0..4 see text[:4] only.
  np.testing.assert_allclose(changed["logits"][:, :5], out["logits"][:, :5],
                             atol=1e-6)
  assert not np.allclose(changed["logits"][:, 5:], out["logits"][:, 5:])
  assert not np.allclose(changed["embedding/text"], out["embedding/text"],
                         atol=1e-4)


def test_cached_decoding_equals_teacher_forcing(setup):
  model, variables, batch, apply = setup
  full = apply(variables, batch)["logits"]
  media, valid = jax.jit(lambda v, b: model.apply(v, b, method=model.encode))(
      variables, batch)
  tokens = jnp.concatenate([jnp.full((3, 1), 2, jnp.int32),
                            batch["text"][:, :-1]], 1)
  # Prefill two tokens, then one token per call (padding included).
  logits, state = jax.jit(lambda t: model.apply(
      variables, t, media, valid, decode=True, method=model.decode,
      mutable=["cache"]))(tokens[:, :2])
  step = jax.jit(lambda state, token: model.apply(
      {**variables, **state}, token, media, valid, start=False,
      full_attention_length=0, decode=True, method=model.decode,
      mutable=["cache"]))
  steps = [logits]
  for t in range(2, tokens.shape[1]):
    logits, state = step(state, tokens[:, t:t + 1])
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5)
  with pytest.raises(ValueError, match="no prompt"):
    model.apply(variables, tokens, media, valid, prompt=tokens,
                method=model.decode)


def test_greedy_generation_equals_argmax_over_full_recomputation(setup):
  model, variables, batch, apply = setup
  tokens = jax.jit(lambda v, b: generate(model, v, b, max_new_tokens=6,
                                         eos_id=1))(variables, batch)
  # Reference: grow each sequence and recompute every logit from scratch
  # (one shape, the batch's: the logits at position t read text[:t] only,
  # the causality tested above).
  text = jnp.zeros((3, 7), jnp.int32)
  for t in range(6):
    logits = apply(variables, {**batch, "text": text})["logits"]
    text = text.at[:, t].set(jnp.argmax(logits[:, t], -1).astype(jnp.int32))
  reference = np.asarray(text[:, :6])
  for row, ref in zip(np.asarray(tokens), reference):
    end = list(ref).index(1) + 1 if 1 in ref else len(ref)
    np.testing.assert_array_equal(row[:end], ref[:end])
    assert (row[end:] == 0).all()


def test_gradients_reach_every_parameter_and_accumulate_exactly(setup):
  """Every parameter (the log scale, the CLS token) gets a gradient, and
  GradCache (`accumulate.cached_embeddings`, the whole_batch path) gives the
  full batch's loss, metrics and gradients (eval mode: BatchNorm would
  differ per microbatch): caching only the embeddings (the objective's
  `cache_split`; the captions in the second pass, the two microbatches
  holding 12 and 14 target tokens) and caching every output alike."""
  model, variables, _, _ = setup
  batch = make_batch(size=4, seed=1)
  objective = coca_objective()

  def forward(params, batch, rng):
    del rng
    return model.apply({**variables, "params": params}, batch,
                       mutable=["intermediates"])

  run = lambda fn: jax.jit(lambda p, b: fn(
      forward, objective, p, b, jax.random.PRNGKey(0)))(
          variables["params"], batch)
  grads, (metrics, _, outputs) = run(accumulate.full_batch)
  zero = [jax.tree_util.keystr(p) for p, g in
          jax.tree_util.tree_flatten_with_path(grads)[0]
          if not np.any(np.asarray(g))]
  assert not zero
  assert float(grads["log_scale"]) != 0
  assert optax.tree.norm(grads["text_decoder"]["cls_token"]) > 0
  split = objectives.cache_split(objective)
  assert split is not None and "logits" not in split.cached
  for fn, cached in (
      (accumulate.gradient_fn(2, whole_batch=True, split=split), False),
      (accumulate.gradient_fn(2, whole_batch=True), True)):
    assert fn.func is accumulate.cached_embeddings
    acc_grads, (acc_metrics, _, acc_outputs) = run(fn)
    assert ("logits" in acc_outputs) == cached
    if cached:
      np.testing.assert_allclose(acc_outputs["logits"], outputs["logits"],
                                 atol=1e-5)
    assert set(acc_metrics) == set(metrics)
    for key, value in metrics.items():
      np.testing.assert_allclose(acc_metrics[key], value, rtol=1e-5,
                                 err_msg=key)
    for (path, g), a in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                            jax.tree.leaves(acc_grads)):
      np.testing.assert_allclose(a, g, atol=1e-5, rtol=1e-4,
                                 err_msg=jax.tree_util.keystr(path))
