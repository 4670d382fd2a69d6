"""Trainer pieces: config parsing, optimizer, sharded steps on 1 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import configs, experiment, objectives, parallel, train
from mmjax.errors import UsageError

CONFIG = "configs/avmnist.py"


SMALL = {"image": {"name": "lenet", "features": 4, "extra_layers": 3},
         "audio": {"name": "lenet", "features": 4, "extra_layers": 3}}


def small_config(fusion="concat", **overrides):
  config = configs.load_config(f"{CONFIG}:fusion={fusion},smoke")
  with config.unlocked():
    config.model.encoders = SMALL
    if fusion == "early":
      config.model.fusion_kwargs = {"encoder": SMALL["audio"]}
  return configs.apply_overrides(config, [f"{k}={v}" for k, v in
                                          overrides.items()])


def batches(n, b=16, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(n):
    yield {"image": rng.integers(0, 255, (b, 28, 28, 1), dtype=np.uint8),
           "audio": rng.integers(0, 255, (b, 28, 28, 1), dtype=np.uint8),
           "mask/image": np.ones(b, bool), "mask/audio": np.ones(b, bool),
           "label": rng.integers(0, 10, b).astype(np.int32)}


def run_steps(config, num_devices, steps=3):
  mesh = parallel.make_mesh(num_devices)
  model = experiment.build_model(config)
  tx, _ = experiment.build_optimizer(config)
  data = list(batches(1)) * steps  # one batch, so the loss must fall
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in data[0].items()}
  state, shardings = experiment.create_train_state(config, model, tx, spec, mesh)
  objective = objectives.make_objective(config.objective, mesh)
  step = jax.jit(train.make_train_step(model, tx, objective),
                 in_shardings=(shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(shardings, None), donate_argnums=(0,))
  losses = []
  for batch in data:
    state, metrics = step(state, parallel.put_batch(
        batch, parallel.batch_sharding(mesh)))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params)


@pytest.mark.parametrize("sharding", ["dp", "fsdp"])
def test_same_global_batch_same_loss_on_1_and_8_devices(sharding):
  assert jax.device_count() == 8
  config = small_config(sharding=sharding)
  losses_1, params_1 = run_steps(config, 1)
  losses_8, params_8 = run_steps(config, 8)
  np.testing.assert_allclose(losses_1, losses_8, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               params_1, params_8)
  assert losses_1[-1] < losses_1[0]


@pytest.mark.parametrize("objective", [
    "softmax", pytest.param("sigmoid", marks=pytest.mark.slow), "sigmoid_ring"])
def test_contrastive_steps_same_on_1_and_8_devices(objective):
  config = configs.load_config(
      f"configs/av_contrastive.py:objective={objective},smoke")
  with config.unlocked():
    config.model.encoders = SMALL
  losses_1, params_1 = run_steps(config, 1)
  losses_8, params_8 = run_steps(config, 8)
  np.testing.assert_allclose(losses_1, losses_8, rtol=1e-5)
  # Adam divides by sqrt(v): parameters with near-zero gradients move by up
  # to the learning rate (1e-3) per step, so float32 reduction order shows at
  # the 1e-5 level in a few of them after three steps.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4),
               params_1, params_8)
  assert losses_1[-1] < losses_1[0]


def test_frozen_parameters_never_change():
  config = configs.load_config("configs/av_contrastive.py:smoke")
  with config.unlocked():
    config.model.encoders = SMALL
  config.frozen = "tower_audio/encoder/.*"
  mesh = parallel.make_mesh(1)
  model = experiment.build_model(config)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
          for k, v in next(batches(1)).items()}
  initial = jax.device_get(experiment.create_train_state(
      config, model, experiment.build_optimizer(config)[0], spec, mesh)[0].params)
  _, params = run_steps(config, 1)
  frozen = initial["tower_audio"]["encoder"]
  jax.tree.map(np.testing.assert_array_equal, frozen,
               params["tower_audio"]["encoder"])
  assert not np.allclose(initial["tower_image"]["projection"]["kernel"],
                         params["tower_image"]["projection"]["kernel"])


def test_fsdp_shards_large_parameters():
  config = small_config(sharding="fsdp")
  mesh = parallel.make_mesh(8)
  model = experiment.build_model(config)
  tx, _ = experiment.build_optimizer(config)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
          for k, v in next(batches(1)).items()}
  abstract = jax.eval_shape(lambda: experiment.create_train_state(
      config, model, tx, spec, mesh)[0])
  shardings = parallel.state_shardings(abstract, mesh, "fsdp", min_fsdp_size=64)
  specs = [s.spec for s in jax.tree.leaves(shardings)]
  assert any(parallel.DATA_AXIS in tuple(s) for s in specs)


def test_parse_arg_and_overrides():
  config = configs.load_config(f"{CONFIG}:fusion=late,smoke,seed=3")
  assert (config.model.fusion, config.seed, config.total_steps) == ("late", 3, 40)
  configs.apply_overrides(config, ["batch_size=64", "optimizer.learning_rate=0.1",
                                   "eval_splits=('test',)"])
  assert (config.batch_size, config.optimizer.learning_rate,
          config.eval_splits) == (64, 0.1, ("test",))


@pytest.mark.parametrize("overrides, message", [
    (["batch_sise=3"], "unknown config key 'batch_sise'"),
    (["optimizer.lr=3"], "unknown config key 'optimizer.lr'"),
    (["batch_size=big"], "config key 'batch_size'"),
    (["model.fusion=nope"], "unknown model.fusion 'nope' (known: audio_only"),
    (["optimizer.name=lion"], "unknown optimizer.name 'lion'"),
    (["model.encoders.image.name=vgg"], "unknown model.encoders.image.name"),
    (["total_steps=0"], "'total_steps' must be positive"),
])
def test_bad_config_is_a_one_line_usage_error(overrides, message):
  with pytest.raises(UsageError, match=message.replace("(", r"\(")) as e:
    experiment.check_config(configs.apply_overrides(
        configs.load_config(CONFIG), overrides))
  assert "\n" not in str(e.value)


def test_bad_config_arguments():
  with pytest.raises(UsageError, match="unknown config argument 'fusoin'"):
    configs.load_config(f"{CONFIG}:fusoin=late")
  with pytest.raises(UsageError, match="config file not found"):
    configs.load_config("configs/nope.py")


def test_batch_size_must_divide_devices():
  with pytest.raises(UsageError, match="'batch_size' is 12, not divisible by "
                     "the 8 devices"):
    parallel.check_batch_size(12, parallel.make_mesh(8))


def test_logit_scale_is_clamped_after_the_step_and_keeps_its_gradient():
  """open_clip clamps the parameter to [0, log 100] after every step; a
  clamp in the forward pass would zero its gradient above 100 instead."""
  config = configs.load_config("configs/av_contrastive.py:smoke")
  tx, _ = experiment.build_optimizer(config)
  params = {"log_scale": jnp.float32(4.7), "w": jnp.ones((2, 2))}
  grads = {"log_scale": jnp.float32(-1.0), "w": jnp.zeros((2, 2))}
  state = tx.init(params)
  for _ in range(20):  # Adam pushes log_scale up by about lr per step
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params["log_scale"], np.log(100.0), rtol=1e-6)
  sigmoid = configs.apply_overrides(
      configs.load_config("configs/av_contrastive.py:objective=sigmoid,smoke"),
      ["optimizer.warmup_steps=0", "optimizer.schedule=constant"])
  tx, _ = experiment.build_optimizer(sigmoid)  # SigLIP: no clamp
  params = {"log_scale": jnp.float32(4.7)}
  updates, _ = tx.update({"log_scale": jnp.float32(-1.0)}, tx.init(params),
                         params)
  assert float(params["log_scale"] + updates["log_scale"]) > 4.7


def test_weight_decay_skips_biases_norm_scales_and_the_logit_scale():
  config = configs.apply_overrides(
      configs.load_config("configs/av_contrastive.py:smoke"),
      ["optimizer.weight_decay=0.5", "optimizer.warmup_steps=0",
       "optimizer.schedule=constant"])
  tx, _ = experiment.build_optimizer(config)
  params = {"log_scale": jnp.float32(1.0), "bias": jnp.float32(-10.0),
            "tower_image": {"projection": {"kernel": jnp.ones((2, 2)),
                                           "bias": jnp.ones(2)},
                            "encoder": {"LayerNorm_0": {"scale": jnp.ones(2)}}}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
  assert moved["tower_image"]["projection"] == {"kernel": True, "bias": False}
  assert not moved["log_scale"] and not moved["bias"]
  assert not moved["tower_image"]["encoder"]["LayerNorm_0"]["scale"]


def test_ast_on_clean_audio_is_normalised_and_pools_its_own_tokens():
  """AST's recipe normalises log-mel input with the training set's
  statistics (tools/audio_norm_stats.py); (mean 0, std 0.5) is the identity
  and left raw dB (about -70 +- 24) hundreds of times the position
  embeddings."""
  audio = configs.load_config("configs/avmnist.py:clean,audio=ast"
                              ).model.encoders.audio
  assert (audio.norm_mean, audio.norm_std) == (-69.51, 24.36)
  assert audio.pool == "cls"
  assert configs.load_config("configs/avmnist.py:clean,grid,audio=ast"
                             ).model.encoders.audio.pool == "none"
