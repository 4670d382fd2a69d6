"""Gradient accumulation (mmjax/accumulate.py, `config.grad_accum_steps`):
microbatched gradients against the full batch's, on 8 simulated devices."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import (accumulate, checkpoint, configs, experiment, methods,
                   objectives, parallel, train)
from mmjax.errors import UsageError
from mmjax.models.factory import (build_classifier, build_contrastive,
                                  build_generative)

# Encoders without BatchNorm or dropout: accumulation is then exact.
VIT = {"name": "vit", "width": 8, "depth": 1, "mlp_dim": 16, "num_heads": 2,
       "patch_size": 7}
TEXT = {"name": "bag_of_embeddings", "vocab_size": 50, "dim": 8}
LENET = {"name": "lenet", "features": 2, "extra_layers": 1}
TOL = {"rtol": 1e-6, "atol": 1e-6}


def av_batch(b, seed=0, present=None):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 255, (b, 28, 28, 1), dtype=np.uint8),
          "audio": rng.integers(0, 255, (b, 28, 28, 1), dtype=np.uint8),
          "mask/image": np.ones(b, bool) if present is None else present,
          "mask/audio": np.ones(b, bool),
          "label": rng.integers(0, 10, b).astype(np.int32)}


def image_text_batch(b, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 255, (b, 28, 28, 1), dtype=np.uint8),
          "text": rng.integers(1, 50, (b, 6)).astype(np.int32)}


def forward_fn(model, variables):
  def forward(params, batch, rng):
    return model.apply({**variables, "params": params}, batch, train=True,
                       mutable=["batch_stats", "intermediates"],
                       rngs={"dropout": rng})
  return forward


def sharded(batch, mesh):
  return parallel.put_batch(batch, parallel.batch_sharding(mesh))


def assert_trees_close(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x, np.float64), np.asarray(y, np.float64), **tol), a, b)


def microbatch_rows(batch_size, steps, devices):
  """The documented layout, written out: microbatch j holds rows
  j L/k ... (j + 1) L/k - 1 of each device's L = B / n consecutive rows."""
  rows = np.arange(batch_size).reshape(devices, steps, -1)
  return rows.transpose(1, 0, 2).reshape(steps, -1)


def make_config(**overrides):
  config = configs.load_config("configs/avmnist.py:smoke,imbalance=ogm_ge")
  with config.unlocked():
    config.model.encoders = {"image": VIT, "audio": VIT}
  return configs.apply_overrides(config, [f"{k}={v}" for k, v in
                                          overrides.items()])


@pytest.fixture(scope="module")
def classifier():
  """An OGM-GE run's parts on 8 devices: concat of two ViTs with auxiliary
  unimodal heads, SGD at a constant rate; (config, model, tx, method, mesh,
  initial state, state shardings)."""
  config = make_config(**{"model.unimodal_heads": "aux",
                          "imbalance.ogm_ge.noise": False,
                          "optimizer.name": "sgd", "batch_size": 32,
                          "optimizer.warmup_steps": 0,
                          "optimizer.schedule": "constant"})
  experiment.check_config(config)
  mesh = parallel.make_mesh(8)
  model = experiment.build_model(config)
  tx, _ = experiment.build_optimizer(config)
  method = methods.build(config, None)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
          for k, v in av_batch(32).items()}
  state, shardings = experiment.create_train_state(config, model, tx, spec,
                                                   mesh, method)
  return config, model, tx, method, mesh, state, shardings


@pytest.fixture(scope="module")
def towers():
  """A ViT image tower and a bag-of-embeddings text tower, embed_dim 4, and
  their variables (the same parameters serve every contrastive objective:
  the objective only sets the initial logit scale and bias)."""
  model = build_contrastive(modalities=("image", "text"),
                            encoders={"image": VIT, "text": TEXT},
                            embed_dim=4, objective="sigmoid")
  init = jax.jit(lambda key, batch: model.init(key, batch, train=False))
  return model, init(jax.random.key(0), image_text_batch(2))


def test_microbatches_stay_on_their_devices_and_merge_back():
  mesh = parallel.make_mesh(8)
  x = jax.device_put(np.arange(64, dtype=np.int32),
                     parallel.batch_sharding(mesh))
  split = jax.jit(lambda x: accumulate.split_batch(x, 4, mesh))
  micro = split(x)
  compiled = split.lower(x).compile().as_text()
  assert not any(op in compiled for op in ("all-to-all", "all-gather",
                                           "collective-permute"))
  np.testing.assert_array_equal(micro, microbatch_rows(64, 4, 8))
  for shard in micro.addressable_shards:  # [4, 2] of device d's own 8 rows
    device = mesh.devices.tolist().index(shard.device)
    assert shard.data.shape == (4, 2)
    assert set(np.asarray(shard.data).ravel()) <= set(range(8 * device,
                                                            8 * device + 8))
  merged = jax.jit(lambda m: accumulate.merge_microbatches(m, 16, mesh))(micro)
  np.testing.assert_array_equal(merged, np.arange(64))
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    accumulate.split_batch(jnp.zeros(40), 3, mesh)


def test_supervised_accumulation_equals_the_full_batch(classifier):
  """k = 4 microbatches of 8 (one example per device) against jax.grad of
  the full batch's loss: gradients, metrics, merged outputs and the
  intermediates a method reads."""
  _, model, _, _, mesh, state, _ = classifier
  variables = {"params": state.params}
  forward = forward_fn(model, variables)
  objective = lambda o, b: objectives.supervised(o, b)
  rng = jax.random.PRNGKey(1)

  @jax.jit
  def full(params, batch):
    def loss(params):
      outputs, updates = forward(params, batch, rng)
      loss, metrics = objective(outputs, batch)
      return loss, (metrics, outputs, updates["intermediates"])
    return jax.grad(loss, has_aux=True)(params)

  accumulated = jax.jit(lambda p, b: accumulate.gradient_fn(4, mesh=mesh)(
      forward, objective, p, b, rng))
  batch = sharded(av_batch(32), mesh)
  grads, (metrics, updates, outputs) = accumulated(variables["params"], batch)
  ref_grads, (ref_metrics, ref_outputs, ref_sown) = full(
      variables["params"], batch)
  assert_trees_close(grads, ref_grads, **TOL)
  assert_trees_close(metrics, ref_metrics, **TOL)
  assert_trees_close(outputs, ref_outputs, **TOL)
  assert_trees_close(updates["intermediates"], ref_sown, **TOL)
  assert outputs["logits"].sharding.spec[0] == parallel.DATA_AXIS

  # The image missing from 11 examples, unevenly over the microbatches: the
  # reported metrics are still the full batch's (each head over the
  # examples that have its modality).
  present = np.ones(32, bool)
  present[[0, 1, 2, 3, 4, 8, 9, 16, 17, 18, 30]] = False
  batch = sharded(av_batch(32, seed=1, present=present), mesh)
  _, (metrics, _, _) = accumulated(variables["params"], batch)
  _, (ref_metrics, _, _) = full(variables["params"], batch)
  assert_trees_close(metrics, ref_metrics, **TOL)


def test_captioning_accumulation_weighs_microbatches_by_their_tokens():
  """The captioning loss is a mean over target tokens: with microbatches
  of 28 and 8 tokens, the accumulated gradient is the full batch's only if
  each microbatch's counts by its tokens (`objectives.loss_weight`)."""
  model = build_generative(
      modalities=(), encoders={}, conditioning="prefix", num_latents=4,
      xattn_every=1, num_heads=2, decoder=dict(
          vocab_size=23, width=16, num_layers=2, num_heads=2, mlp_dim=32,
          max_length=16))
  text = np.random.default_rng(3).integers(2, 23, (8, 8)).astype(np.int32)
  text[:4, 7:] = 0  # microbatch 0: 4 x 7 target tokens
  text[4:, 2:] = 0  # microbatch 1: 4 x 2 target tokens
  batch = {"text": jnp.asarray(text)}
  variables = model.init(jax.random.PRNGKey(0), batch)
  forward = forward_fn(model, variables)
  objective = lambda o, b: objectives.captioning(o, b)
  rng = jax.random.PRNGKey(1)
  weight = objectives.loss_weight(objectives.captioning)
  assert int(weight(batch)) == 4 * 7 + 4 * 2
  full, (ref_metrics, _, _) = accumulate.full_batch(
      forward, objective, variables["params"], batch, rng)
  grads, (metrics, _, _) = accumulate.gradient_fn(2, loss_weight=weight)(
      forward, objective, variables["params"], batch, rng)
  assert_trees_close(grads, full, **TOL)
  assert_trees_close(metrics, ref_metrics, **TOL)
  unweighted, _ = accumulate.gradient_fn(2)(
      forward, objective, variables["params"], batch, rng)
  gap = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(unweighted), jax.tree.leaves(full)))
  assert gap > 1e-3  # a mean of the two token means is another gradient


def test_batchnorm_uses_microbatch_statistics_and_averages_the_updates():
  """LeNet (BatchNorm): each microbatch is normalised with its own
  statistics; gradients are the microbatches' mean and the running averages
  the mean of the microbatches' updates, computed here one microbatch at a
  time on one device."""
  mesh = parallel.make_mesh(8)
  model = build_classifier(modalities=("image", "audio"),
                           encoders={"image": LENET, "audio": LENET},
                           fusion="concat", num_classes=10, head_hidden=(8,))
  variables = jax.jit(lambda key, batch: model.init(key, batch, train=False))(
      jax.random.key(0), av_batch(2))
  forward = forward_fn(model, variables)
  rng = jax.random.PRNGKey(1)
  batch = av_batch(32)
  grads, (_, updates, _) = jax.jit(
      lambda p, b: accumulate.gradient_fn(2, mesh=mesh)(
          forward, objectives.supervised, p, b, rng))(
              variables["params"], sharded(batch, mesh))

  def one(params, micro, j):
    def loss(params):
      outputs, updates = forward(params, micro, jax.random.fold_in(rng, j))
      return objectives.supervised(outputs, micro)[0], updates["batch_stats"]
    return jax.grad(loss, has_aux=True)(params)

  one = jax.jit(one)
  parts = [one(variables["params"], jax.tree.map(lambda x: x[rows], batch), j)
           for j, rows in enumerate(microbatch_rows(32, 2, 8))]
  mean = lambda *xs: sum(xs) / len(xs)
  assert_trees_close(grads, jax.tree.map(mean, *[g for g, _ in parts]),
                     **TOL)
  assert_trees_close(updates["batch_stats"],
                     jax.tree.map(mean, *[s for _, s in parts]), **TOL)
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])


@pytest.mark.parametrize("name", [
    "softmax", pytest.param("sigmoid", marks=pytest.mark.slow),  # as the ring
    "sigmoid_ring"])
def test_contrastive_two_pass_equals_the_full_batch(name, towers):
  """GradCache: the negatives stay the whole global batch of 32 on 8
  devices; loss, metrics and gradients (the towers', the logit scale's and
  the bias's) equal the full batch's."""
  mesh = parallel.make_mesh(8)
  model, variables = towers
  forward = forward_fn(model, variables)
  objective = objectives.make_objective(name, mesh)
  assert objectives.whole_batch(objective)
  rng = jax.random.PRNGKey(1)

  @jax.jit
  def full(params, batch):
    def loss(params):
      return objective(forward(params, batch, rng)[0], batch)
    return jax.value_and_grad(loss, has_aux=True)(params)

  grad_fn = accumulate.gradient_fn(4, whole_batch=True, mesh=mesh)
  batch = sharded(image_text_batch(32), mesh)
  grads, (metrics, _, outputs) = jax.jit(
      lambda p, b: grad_fn(forward, objective, p, b, rng))(
          variables["params"], batch)
  (loss, ref_metrics), ref_grads = full(variables["params"], batch)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  assert_trees_close(metrics, ref_metrics, rtol=1e-5, atol=1e-6)
  assert_trees_close(grads, ref_grads, rtol=1e-5, atol=1e-6)
  assert abs(float(grads["log_scale"])) > 1e-4  # a real check of the scalars
  assert outputs["embedding/image"].shape == (32, 4)


def test_train_step_with_accumulation_and_a_method_hook(classifier):
  """The jitted trainer step with k = 2 on 8 devices, OGM-GE reading the
  merged outputs and intermediates: the same step as k = 1 (SGD, so
  parameters follow gradients linearly), the state's shapes and shardings
  unchanged, one step counted."""
  config, model, tx, method, mesh, initial, shardings = classifier
  batch = av_batch(32)
  objective = objectives.make_objective(config.objective, mesh)
  results = []
  for k in (1, 2):
    state = jax.tree.map(jnp.copy, initial)  # the step donates its state
    step = jax.jit(train.make_train_step(model, tx, objective, method,
                                         grad_accum_steps=k, mesh=mesh),
                   in_shardings=(shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    results.append(step(state, sharded(batch, mesh)))
  (state_1, metrics_1), (state_2, metrics_2) = results
  assert int(state_2.step) == 1
  same = jax.tree.map(lambda a, b: (a.shape, a.dtype, a.sharding) ==
                      (b.shape, b.dtype, b.sharding), state_1, state_2)
  assert all(jax.tree.leaves(same))
  assert not np.allclose(initial.params["head"]["dense_0"]["kernel"],
                         state_2.params["head"]["dense_0"]["kernel"])
  assert_trees_close(metrics_1, metrics_2, rtol=1e-5, atol=1e-6)
  assert {"ogm/rho/image", "ogm/k/audio"} <= set(metrics_2)
  assert_trees_close(state_1.params, state_2.params, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("overrides, message", [
    ({"grad_accum_steps": 0}, "config key 'grad_accum_steps' must be a "
     "positive integer, got 0"),
    ({"grad_accum_steps": 3}, "config key 'grad_accum_steps' (3) must divide "
     "the per-process batch size 32"),
    ({"grad_accum_steps": 8}, "config key 'grad_accum_steps' (8): a "
     "microbatch of 4 examples is not divisible by the 8 devices"),
])
def test_bad_grad_accum_steps_is_a_one_line_usage_error(overrides, message):
  config = make_config(batch_size=32, **overrides)
  with pytest.raises(UsageError) as e:
    experiment.check_config(config)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_grad_accum_steps_that_fit_the_mesh_pass_the_check():
  experiment.check_config(make_config(batch_size=32, grad_accum_steps=4))
  experiment.check_config(make_config(batch_size=32, grad_accum_steps=8,
                                      mesh_devices=4))


def test_bad_grad_accum_steps_exits_2_from_the_command_line(tmp_path, capsys):
  status = train.main(["--config", "configs/avmnist.py:smoke", "--workdir",
                       str(tmp_path), "--config.grad_accum_steps=3"])
  assert status == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: config key 'grad_accum_steps' (3) must divide the "
                 "per-process batch size 128"]


def tiny_run_config(data_dir):
  """AV-MNIST image_only, a LeNet of 2 and 4 channels, 4 steps of 32 as 2
  microbatches of 16 (2 per device), evaluated on test."""
  config = configs.load_config("configs/avmnist.py:fusion=image_only,smoke")
  config = configs.apply_overrides(config, [
      f"data_dir={data_dir}", "batch_size=32", "grad_accum_steps=2",
      "total_steps=4", "optimizer.warmup_steps=1", "checkpoint_every=2",
      "log_every=2", "eval_batch_size=200", "eval_splits=('test',)"])
  with config.unlocked():
    config.model.encoders = {"image": LENET, "audio": LENET}
    config.evaluators = {"classification": {}}
  experiment.check_config(config)
  return config


def test_accumulated_run_trains_through_the_trainer(tmp_path,
                                                    avmnist_data_dir):
  state, final = train.train(tiny_run_config(avmnist_data_dir), str(tmp_path))
  assert int(state.step) == 4
  rows = [json.loads(line) for line in
          (tmp_path / "metrics.jsonl").read_text().splitlines()]
  logged = {r["step"]: r for r in rows if "train/loss" in r}
  assert sorted(logged) == [2, 4]
  assert all(np.isfinite(r["train/loss"]) for r in logged.values())
  assert logged[2]["train_flops_per_example"] > 0
  assert 0 <= final["eval/avmnist/classification/accuracy"] <= 1


@pytest.mark.slow
def test_accumulated_run_stopped_and_resumed_is_bit_identical(
    tmp_path, avmnist_data_dir, monkeypatch):
  """A run with grad_accum_steps=2 stopped after its step-2 checkpoint and
  resumed ends bit-identical to an uninterrupted one (the SIGKILL test of
  test_end_to_end.py, in-process: the state keeps its shapes)."""
  config = tiny_run_config(avmnist_data_dir)
  reference, _ = train.train(config, str(tmp_path / "ref"))
  save = checkpoint.Checkpointer.save

  def save_then_stop(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == 2:
      raise KeyboardInterrupt

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_stop)
  with pytest.raises(KeyboardInterrupt):
    train.train(config, str(tmp_path / "run"))
  monkeypatch.undo()
  resumed, _ = train.train(config, str(tmp_path / "run"))
  assert int(resumed.step) == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(reference),
               jax.device_get(resumed))
