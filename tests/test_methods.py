"""Training methods (mmjax/methods: OGM-GE, G-Blending) and unimodal heads,
on tiny shapes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import configs, experiment, methods, objectives, parallel, train
from mmjax.errors import UsageError
from mmjax.evaluators import classification, missing_modality
from mmjax.methods import gblend, ogm_ge

SMALL = {"image": {"name": "lenet", "features": 4, "extra_layers": 3},
         "audio": {"name": "lenet", "features": 4, "extra_layers": 3}}


def make_batch(b=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 255, (b, 28, 28, 1), dtype=np.uint8),
          "audio": rng.integers(0, 255, (b, 28, 28, 1), dtype=np.uint8),
          "mask/image": np.ones(b, bool), "mask/audio": np.ones(b, bool),
          "label": rng.integers(0, 10, b).astype(np.int32)}


def make_config(args="", **overrides):
  config = configs.load_config(f"configs/avmnist.py:smoke{',' if args else ''}"
                               f"{args}")
  with config.unlocked():
    config.model.encoders = SMALL
  config = configs.apply_overrides(
      config, [f"{k}={v}" for k, v in overrides.items()])
  experiment.check_config(config)
  return config


def model_and_grads(heads, batch, weights=None, head_hidden=(100,)):
  """(model, variables, outputs, grads of the objective, intermediates) for a
  concat model with `heads` unimodal heads."""
  config = make_config(**{"model.unimodal_heads": heads,
                          "model.head_hidden": head_hidden})
  model = experiment.build_model(config)
  variables = model.init(jax.random.key(0), batch, train=False)

  def loss(params):
    outputs, sown = model.apply({**variables, "params": params}, batch,
                                train=False, mutable=["intermediates"])
    return (objectives.supervised(outputs, batch, weights)[0],
            (outputs, sown["intermediates"]))

  grads, (outputs, sown) = jax.jit(jax.grad(loss, has_aux=True))(
      variables["params"])
  return model, variables, outputs, grads, sown


# ---------------------------------------------------------------- OGM-GE ---


def test_ogm_coefficients_by_hand():
  # Two modalities: rho_a = 6 / 3 = 2 > 1, so k_a = 1 - tanh(0.5 * 2).
  rho, k = ogm_ge.ogm_coefficients(jnp.array([6.0, 3.0]),
                                      jnp.array([8.0, 8.0]), 0.5)
  np.testing.assert_allclose(rho, [2.0, 0.5], rtol=1e-6)
  np.testing.assert_allclose(k, [1 - 0.7615941559557649, 1.0], rtol=1e-6)
  # Means over present examples: 2 / 2 = 1.0 vs 3 / 6 = 0.5.
  rho, k = ogm_ge.ogm_coefficients(jnp.array([2.0, 3.0]),
                                      jnp.array([2.0, 6.0]), 0.1)
  np.testing.assert_allclose(rho, [2.0, 0.5], rtol=1e-6)
  np.testing.assert_allclose(k, [1 - math.tanh(0.2), 1.0], rtol=1e-6)
  # Three modalities: rho^u = mean_u / mean of the others' means
  # (0.75 / 0.375, 0.5 / 0.5, 0.25 / 0.625); only rho > 1 is modulated.
  rho, k = ogm_ge.ogm_coefficients(jnp.array([3.0, 2.0, 1.0]),
                                      jnp.full(3, 4.0), 0.1)
  np.testing.assert_allclose(rho, [2.0, 1.0, 0.4], rtol=1e-6)
  np.testing.assert_allclose(k, [1 - math.tanh(0.2), 1.0, 1.0], rtol=1e-6)
  # A modality absent from the whole batch: no modulation.
  _, k = ogm_ge.ogm_coefficients(jnp.array([6.0, 0.0]),
                                    jnp.array([8.0, 0.0]), 0.5)
  np.testing.assert_array_equal(k, [1.0, 1.0])


def test_modality_scores_sum_label_probabilities_over_present_examples():
  logits = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
  labels = np.array([0, 2, 1, 2])
  present = np.array([True, True, False, True])
  outputs = {"unimodal_logits/a": logits, "unimodal_present/a": present}
  scores, counts = ogm_ge.modality_scores(outputs, jnp.asarray(labels),
                                             ("a",))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  expected = probs[np.arange(4), labels][present].sum()
  np.testing.assert_allclose(scores, [expected], rtol=1e-6)
  np.testing.assert_array_equal(counts, [3.0])


def dominant_image_outputs(labels, b):
  """Unimodal outputs where the image head is sure of the label and the
  audio head is uniform: image dominates."""
  return {"unimodal_logits/image": jax.nn.one_hot(labels, 10),
          "unimodal_logits/audio": jnp.zeros((b, 10)),
          "unimodal_present/image": jnp.ones(b, bool),
          "unimodal_present/audio": jnp.ones(b, bool)}


OGM_OPTIONS = {"alpha": 0.5, "start_step": 0, "end_step": -1, "noise": False,
               "conv_only": False}


def test_ogm_scales_only_the_dominant_encoder_by_exactly_k():
  batch = make_batch()
  _, _, _, grads, _ = model_and_grads("probe", batch)
  outputs = dominant_image_outputs(batch["label"], 8)
  modulate = jax.jit(lambda grads, step, **options: ogm_ge.ogm_ge(
      grads, outputs, jnp.asarray(batch["label"]), step, jax.random.key(0),
      ("audio", "image"), **options), static_argnames=tuple(OGM_OPTIONS))
  new, metrics = modulate(grads, jnp.int32(3), **OGM_OPTIONS)
  p_image = math.e / (math.e + 9)
  k = 1 - math.tanh(0.5 * p_image / 0.1)
  np.testing.assert_allclose(metrics["ogm/k/image"], k, rtol=1e-5)
  assert float(metrics["ogm/k/audio"]) == 1.0
  jax.tree.map(lambda g, n: np.testing.assert_allclose(n, k * g, rtol=1e-6),
               grads["encoder_image"], new["encoder_image"])
  for key in grads:
    if key != "encoder_image":
      jax.tree.map(np.testing.assert_array_equal, grads[key], new[key])
  assert any(float(jnp.abs(g).max()) > 0
             for g in jax.tree.leaves(grads["encoder_image"]))
  # Outside the window nothing changes and k is logged as 1.
  late, metrics = modulate(grads, jnp.int32(3),
                         **dict(OGM_OPTIONS, start_step=4, noise=True))
  jax.tree.map(np.testing.assert_array_equal, grads, late)
  assert float(metrics["ogm/k/image"]) == 1.0


def test_ogm_conv_only_modulates_only_4d_kernels():
  grads = {"encoder_image": {"conv": {"kernel": jnp.ones((3, 3, 1, 2))},
                             "bn": {"scale": jnp.ones(2)}}}
  new = ogm_ge.modulate_encoder_grads(grads, {"image": 0.5},
                                         jax.random.key(0), 0.0,
                                         conv_only=True)
  np.testing.assert_array_equal(new["encoder_image"]["conv"]["kernel"], 0.5)
  np.testing.assert_array_equal(new["encoder_image"]["bn"]["scale"], 1.0)


def test_ge_noise_has_the_gradients_std():
  g = jax.random.normal(jax.random.key(1), (200, 500)) * 3.0 + 1.0
  expected = float(np.std(np.asarray(g), ddof=1)) + 1e-8
  np.testing.assert_allclose(ogm_ge.gradient_noise_std(g), expected,
                             rtol=1e-5)
  np.testing.assert_allclose(ogm_ge.gradient_noise_std(jnp.ones(1)), 1e-8)
  grads = {"encoder_audio": {"w": g}, "encoder_image": {"w": g},
           "head": {"w": g}}
  new = ogm_ge.modulate_encoder_grads(
      grads, {"audio": 1.0, "image": 0.25}, jax.random.key(2), 1.0)
  for m, k in (("audio", 1.0), ("image", 0.25)):
    noise = np.asarray(new[f"encoder_{m}"]["w"] - k * g)
    assert abs(noise.mean()) < 0.03
    np.testing.assert_allclose(noise.std(), expected, rtol=0.01)
  np.testing.assert_array_equal(new["head"]["w"], g)
  # Different tensors draw different noise.
  assert not np.allclose(new["encoder_audio"]["w"] - g,
                         new["encoder_image"]["w"] - 0.25 * g)


# ------------------------------------------------------------ G-Blending ---


def test_gblend_weights_from_hand_made_losses():
  # Heads (fused, audio, image). dG = (1.0, 0.2, 0.6); dO = (0.2, 0.1, 0.4);
  # dG / dO^2 = (25, 20, 3.75), sum 48.75.
  before = np.array([2.0, 2.2, 2.1])
  weights, delta_g, delta_o = gblend.blend_weights(
      before, before, [1.0, 2.0, 1.5], [0.8, 1.9, 1.1], 0.01)
  np.testing.assert_allclose(delta_g, [1.0, 0.2, 0.6], atol=1e-12)
  np.testing.assert_allclose(delta_o, [0.2, 0.1, 0.4], atol=1e-12)
  np.testing.assert_allclose(weights, np.array([25, 20, 3.75]) / 48.75,
                             rtol=1e-9)
  # Held-out loss rose for audio (dG < 0): weight 0. The image gap shrank
  # (dO = -0.1 < 0.01): dO is floored, 0.6 / 0.01^2 = 6000.
  weights, _, _ = gblend.blend_weights(
      before, before, [1.0, 2.3, 1.5], [0.8, 2.0, 1.6], 0.01)
  np.testing.assert_allclose(weights, np.array([25, 0, 6000]) / 6025,
                             rtol=1e-9)
  # No head generalised: keep the previous weights.
  weights, _, _ = gblend.blend_weights(before, before, before + 0.1,
                                          before, 0.01)
  assert weights is None


# ---------------------------------------------------------------- heads ---


def test_probe_heads_leave_encoder_gradients_unchanged_aux_heads_do_not():
  batch = make_batch()
  for heads in ("probe", "aux"):
    model, variables, _, grads, _ = model_and_grads(heads, batch)

    def fused_loss(params):
      out = model.apply({**variables, "params": params}, batch, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(
          out["logits"], batch["label"]).mean()

    fused = jax.jit(jax.grad(fused_loss))(variables["params"])
    for m in ("image", "audio"):
      same = jax.tree.leaves(jax.tree.map(
          lambda a, b: bool(np.allclose(a, b, rtol=1e-5, atol=1e-7)),
          grads[f"encoder_{m}"], fused[f"encoder_{m}"]))
      assert all(same) if heads == "probe" else not all(same), (heads, m)
      assert float(jnp.abs(grads[f"unimodal_head_{m}"]["kernel"]).sum()) > 0


def test_heads_do_not_change_the_fused_model():
  batch = make_batch()
  plain = experiment.build_model(make_config())
  base = plain.init(jax.random.key(0), batch, train=False)
  _, variables, outputs, _, _ = model_and_grads("probe", batch)
  params = {k: v for k, v in variables["params"].items()
            if not k.startswith("unimodal_head_")}
  jax.tree.map(np.testing.assert_array_equal, base["params"], params)
  np.testing.assert_allclose(plain.apply(base, batch, train=False),
                             outputs["logits"], atol=1e-6)


def test_decomposed_logits_sum_to_the_linear_concat_head():
  batch = dict(make_batch(), **{"mask/audio": np.arange(8) % 2 == 0})
  _, variables, logits, _, sown = model_and_grads("none", batch,
                                                  head_hidden=())
  assert set(variables["params"]) == {"encoder_image", "encoder_audio", "head"}
  head = variables["params"]["head"]["dense_0"]
  parts = ogm_ge.decomposed_logits(sown, head, ("audio", "image"))
  np.testing.assert_allclose(parts["image"] + parts["audio"], logits,
                             atol=1e-5)
  # A missing modality contributes b / 2 only.
  np.testing.assert_allclose(parts["audio"][1], head["bias"] / 2, atol=1e-6)
  np.testing.assert_array_equal(sown["present/audio"][0], batch["mask/audio"])


def test_evaluators_report_unimodal_accuracy_over_present_examples():
  labels = np.array([0, 1, 2, 3])
  batch = {"image": jnp.zeros(4), "audio": jnp.zeros(4),
           "mask/image": jnp.ones(4, bool), "mask/audio": jnp.ones(4, bool),
           "label": jnp.asarray(labels),
           "valid": jnp.asarray([True, True, True, False])}

  def predict(b):
    audio_present = b["mask/audio"]
    wrong = jnp.eye(4)[(labels + 1) % 4]
    return {"logits": jnp.eye(4)[labels],
            "unimodal_logits/image": jnp.eye(4)[labels],
            "unimodal_present/image": b["mask/image"],
            # Right on example 0 only; absent on example 1.
            "unimodal_logits/audio": wrong.at[0].set(jnp.eye(4)[0]),
            "unimodal_present/audio": audio_present.at[1].set(False)}

  results = dict(classification(predict, [batch]))
  assert results["accuracy"] == 1.0
  assert results["unimodal/image/accuracy"] == 1.0
  assert results["unimodal/audio/accuracy"] == 0.5  # examples 0 and 2
  assert results["unimodal/audio/loss"] > results["unimodal/image/loss"]
  assert dict(missing_modality(predict, [batch])) == {
      "without_audio/accuracy": 1.0, "without_image/accuracy": 1.0}


# --------------------------------------------------------------- config ---


@pytest.mark.parametrize("args, overrides, message", [
    ("imbalance=ogm_ge", {"model.unimodal_heads": "none"},
     "ogm_ge scores each modality with unimodal heads"),
    ("imbalance=gblend", {"model.unimodal_heads": "probe"},
     "gblend needs model.unimodal_heads 'aux'"),
    ("probe", {"model.unimodal_heads": "decomposed"},
     "unknown model.unimodal_heads 'decomposed'"),
    ("probe,fusion=early", {}, "fusion 'early' has none"),
    ("imbalance=ogm_ge,fusion=image_only", {}, "needs two or more modalities"),
    ("", {"imbalance.method": "mixup"}, "unknown imbalance.method 'mixup'"),
    ("", {"model.unimodal_heads": "linear"},
     "unknown model.unimodal_heads 'linear'"),
    ("imbalance=gblend", {"imbalance.gblend.every": 0},
     "'imbalance.gblend.every' must be positive"),
])
def test_bad_imbalance_config_is_a_one_line_usage_error(args, overrides,
                                                        message):
  with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(
      ")", r"\)")) as e:
    make_config(args, **overrides)
  assert "\n" not in str(e.value)


def test_ogm_window_follows_a_total_steps_override_unless_set():
  def end_step(*overrides):
    config = configs.apply_overrides(
        configs.load_config("configs/avmnist.py:imbalance=ogm_ge,steps=600"),
        overrides)
    return config.imbalance.ogm_ge.end_step
  assert end_step() == 300
  assert end_step("total_steps=1000") == 500
  assert end_step("imbalance.ogm_ge.end_step=7", "total_steps=1000") == 7


@pytest.mark.parametrize("spec", [
    "configs/avmnist.py", "configs/av_contrastive.py", "configs/lit_mnist.py",
    "configs/coco_mini.py"])
def test_default_configs_train_as_before(spec):
  config = configs.load_config(spec)
  experiment.check_config(config)
  method = methods.build(config, None)
  assert type(method) is methods.Method  # pylint: disable=unidiomatic-typecheck
  assert method.init_state() == {}
  assert method.loss_weights({}) is None
  if config.objective == "supervised":
    assert experiment.build_model(config).unimodal_heads == "none"


# ----------------------------------------------------------- train steps ---


class FakeRun:
  """What a method may read of a run (`mmjax.methods`), over a list source."""

  def __init__(self, config, mesh, source):
    self.config, self.mesh, self.train_source = config, mesh, source

  def data_source(self, split):
    del split
    return self.train_source

  def eval_batches(self, source):
    return experiment.Experiment.eval_batches(self, source)

  def train_iterator(self, seed=None):
    return experiment.Experiment.train_iterator(self, seed)


def run_steps(config, steps=3, gblend_source=None):
  """A few jitted train steps on one batch: (losses, metrics, state, rows)."""
  mesh = parallel.make_mesh(1)
  model = experiment.build_model(config)
  tx, _ = experiment.build_optimizer(config)
  batch = make_batch(16)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  method = methods.build(config, None if gblend_source is None else
                         FakeRun(config, mesh, gblend_source))
  state, shardings = experiment.create_train_state(config, model, tx, spec,
                                                   mesh, method)
  step = jax.jit(train.make_train_step(
      model, tx, objectives.make_objective(config.objective, mesh), method),
                 in_shardings=(shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(shardings, None))
  predict = experiment.make_predict_fn(model)
  if gblend_source is not None:
    state, _ = method.after_step(0, state, predict, step)
  losses, rows = [], []
  for i in range(steps):
    state, metrics = step(state, parallel.put_batch(
        batch, parallel.batch_sharding(mesh)))
    losses.append(float(metrics["loss"]))
    if gblend_source is not None:
      state, row = method.after_step(i + 1, state, predict, step)
      rows.append(row)
  return losses, jax.device_get(metrics), state, rows


def test_ogm_ge_train_steps_are_finite():
  for args in ("imbalance=ogm_ge", "imbalance=ogm_ge,linear_head"):
    losses, metrics, state, _ = run_steps(make_config(args))
    assert np.all(np.isfinite(losses)), args
    assert losses[-1] < losses[0], args
    for m in ("image", "audio"):
      if "linear_head" not in args:  # probe heads; else the split fused head
        assert np.isfinite(metrics[f"unimodal/{m}/accuracy"])
      assert 0 < metrics[f"ogm/k/{m}"] <= 1
      assert np.isfinite(metrics[f"ogm/score/{m}"])
    assert state.method_state == {}


@pytest.mark.parametrize("estimator", ["separate", "trajectory"])
def test_gblend_train_steps_update_the_weights_in_the_state(estimator):
  config = make_config("imbalance=gblend", eval_batch_size=8, batch_size=16,
                       **{"imbalance.gblend.num_examples": 12,
                          "imbalance.gblend.every": 1,
                          "imbalance.gblend.estimate_steps": 2,
                          "imbalance.gblend.estimator": estimator})
  rng = np.random.default_rng(3)
  source = [{"image": rng.integers(0, 255, (28, 28, 1), dtype=np.uint8),
             "audio": rng.integers(0, 255, (28, 28, 1), dtype=np.uint8),
             "label": np.int64(i % 10)} for i in range(20)]
  losses, metrics, state, rows = run_steps(config, gblend_source=source)
  assert np.all(np.isfinite(losses))
  weights = np.asarray(state.method_state["weights"])
  np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)
  assert int(state.method_state["measured_at"]) == 3
  # The last step read the weights of the measurement before it.
  assert metrics["gblend/weight/fused"] == pytest.approx(
      rows[-2]["gblend/weight/fused"])
  assert {"gblend/delta_g/image", "gblend/held_out_loss/audio"} <= set(
      rows[0])


def test_gblend_separate_estimate_trains_copies_and_keeps_the_model():
  """The paper's estimate trains each head alone from a copy of the state;
  the model itself is left as it was, only the weights change."""
  config = make_config("imbalance=gblend", eval_batch_size=8, batch_size=16,
                       **{"imbalance.gblend.num_examples": 12,
                          "imbalance.gblend.estimate_steps": 3})
  rng = np.random.default_rng(3)
  source = [{"image": rng.integers(0, 255, (28, 28, 1), dtype=np.uint8),
             "audio": rng.integers(0, 255, (28, 28, 1), dtype=np.uint8),
             "label": np.int64(i % 10)} for i in range(20)]
  mesh = parallel.make_mesh(1)
  model = experiment.build_model(config)
  tx, _ = experiment.build_optimizer(config)
  batch = make_batch(16)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  method = methods.build(config, FakeRun(config, mesh, source))
  state, shardings = experiment.create_train_state(config, model, tx, spec,
                                                   mesh, method)
  step = jax.jit(train.make_train_step(
      model, tx, objectives.make_objective(config.objective, mesh), method),
                 in_shardings=(shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(shardings, None), donate_argnums=(0,))
  before = jax.device_get(state.params)
  new, row = method.after_step(0, state, experiment.make_predict_fn(model),
                               step)
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.device_get(new.params))
  weights = np.asarray(new.method_state["weights"])
  np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)
  assert not np.allclose(weights, 1 / 3)  # estimated at step 0 already
  # Each head's held-out loss fell when it trained alone (dG > 0 somewhere).
  assert max(row[f"gblend/delta_g/{h}"] for h in method.heads) > 0


def test_gblend_loss_is_the_weighted_sum_of_the_heads():
  batch = make_batch()
  weights = {"fused": 0.5, "audio": 0.2, "image": 0.3}
  _, _, outputs, _, _ = model_and_grads("aux", batch)
  loss, metrics = objectives.supervised(outputs, batch, weights)
  expected = (0.5 * metrics["fused_loss"] + 0.2 *
              metrics["unimodal/audio/loss"] + 0.3 *
              metrics["unimodal/image/loss"])
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  method = methods.build(make_config("imbalance=gblend"), None)
  state = method.init_state()
  np.testing.assert_allclose(state["weights"], [1 / 3] * 3)
  assert set(method.loss_weights(state)) == {"fused", "audio", "image"}


def test_ogm_ge_trains_with_the_papers_sgd_and_warns_under_adamw(capsys):
  config = configs.load_config("configs/avmnist.py:imbalance=ogm_ge")
  assert (config.optimizer.name, config.optimizer.momentum) == ("sgd", 0.9)
  assert config.optimizer.weight_decay == 1e-4
  assert configs.load_config("configs/avmnist.py").optimizer.name == "adamw"
  methods.build(config, run=object())
  assert "warning" not in capsys.readouterr().err
  adam = make_config("imbalance=ogm_ge,optimizer=adamw")
  methods.build(adam, run=object())
  assert "warning: imbalance.method ogm_ge with optimizer.name 'adamw'" in (
      capsys.readouterr().err)
