"""Mixed precision: config.dtype / config.param_dtype through every module.

With dtype=bfloat16 the matrix multiplications and convolutions of the train
step are bfloat16, while parameters, optimizer state and checkpoints stay
float32 and the model's outputs (logits, embeddings) are float32. The
default (float32) computes what mmjax computed before it had these keys;
tests/test_models.py::test_avmnist_concat_parameter_tree_is_unchanged and the
per-module tests check the trees and values of the defaults.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax import checkpoint as ocp

import test_fusion_contract as contract
from mmjax import checkpoint, configs, experiment, objectives, parallel, train
from mmjax.errors import UsageError
from mmjax.models import precision
from mmjax.models.encoders import LogMelSpectrogram
from mmjax.models.factory import build_classifier, build_model
from mmjax.models.fusion import FUSIONS

B = 8  # divisible by the 8 simulated devices


def avmnist_config(*overrides):
  """configs/avmnist.py (concat fusion of two LeNets, narrower than the
  recipe's so that the train step compiles in seconds) with `key=value`
  overrides."""
  config = configs.load_config("configs/avmnist.py")
  config.unlock()
  for item in overrides:
    key, value = item.split("=")
    config[key] = value
  config.batch_size = B
  config.model.encoders.image.features = 2
  config.model.encoders.audio.update(features=2, extra_layers=3)
  return config


def avmnist_spec():
  """An avmnist batch (spectrograms smaller than the dataset's 112 x 112):
  uint8 image and spectrogram, masks, labels."""
  return {"image": jax.ShapeDtypeStruct((B, 28, 28, 1), jnp.uint8),
          "audio": jax.ShapeDtypeStruct((B, 32, 32, 1), jnp.uint8),
          "mask/image": jax.ShapeDtypeStruct((B,), jnp.bool_),
          "mask/audio": jax.ShapeDtypeStruct((B,), jnp.bool_),
          "label": jax.ShapeDtypeStruct((B,), jnp.int32)}


def floating_dtypes(tree) -> set[str]:
  return {str(x.dtype) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)}


def matmul_dtypes(lowered_text: str) -> dict[str, set[str]]:
  """{"dot_general" / "convolution": element types of their operands and
  results} in StableHLO text."""
  found = {"dot_general": set(), "convolution": set()}
  for line in lowered_text.splitlines():
    match = re.search(r"stablehlo\.(dot_general|convolution)", line)
    if match:
      found[match.group(1)].update(
          re.findall(r"tensor<(?:\d+x)*(bf16|f16|f32)>", line))
  return found


def train_step_parts(config):
  """(model, optimizer, batch spec, jittable train step) of the config, the
  step as `mmjax.train` makes it."""
  model = build_model(config)
  tx, _ = experiment.build_optimizer(config)
  spec = (avmnist_spec() if config.objective == "supervised"
          else contrastive_spec())
  step = train.make_train_step(
      model, tx, objectives.make_objective(config.objective,
                                           parallel.make_mesh(0)))
  return model, tx, spec, step


def abstract_state(model, tx, spec):
  """The train state's shapes and dtypes, as `create_train_state` makes it
  (nothing is compiled)."""
  def init(rng):
    batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in spec.items()}
    variables = model.init({"params": rng, "dropout": rng}, batch)
    return experiment.TrainState(
        step=jnp.zeros((), jnp.int32), params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(variables["params"]), rng=rng,
        nonfinite_step=jnp.full((), -1, jnp.int32))
  return jax.eval_shape(init, jax.random.key(0))


def contrastive_spec():
  return {"image": jax.ShapeDtypeStruct((B, 16, 16, 3), jnp.uint8),
          "text": jax.ShapeDtypeStruct((B, 6), jnp.int32)}


def vit_bert_config(*overrides):
  """A tiny ViT + BERT SigLIP model (as configs/coco_mini.py's towers)."""
  config = avmnist_config(*overrides)
  config.modalities = ("image", "text")
  config.objective = "sigmoid"
  config.model.encoders = {
      "image": {"name": "vit", "width": 16, "depth": 2, "mlp_dim": 32,
                "num_heads": 2, "patch_size": 4},
      "text": {"name": "bert", "vocab_size": 40, "hidden_size": 16,
               "num_layers": 2, "num_heads": 2, "intermediate_size": 32,
               "max_position_embeddings": 8, "pool": "mean"}}
  config.model.embed_dim = 8
  return config


def test_bfloat16_keeps_parameters_and_checkpoints_float32(tmp_path):
  config = avmnist_config("dtype=bfloat16")
  model, tx, spec, step = train_step_parts(config)
  state, _ = experiment.create_train_state(config, model, tx, spec,
                                           parallel.make_mesh(0))
  assert floating_dtypes(state.params) == {"float32"}
  assert floating_dtypes(state.batch_stats) == {"float32"}
  assert floating_dtypes(state.opt_state) == {"float32"}
  # After a train step (traced, not compiled) everything is float32 still,
  # the gradients and the loss too.
  new_state, metrics = jax.eval_shape(step, state, spec)
  assert floating_dtypes(new_state.params) == {"float32"}
  assert floating_dtypes(new_state.batch_stats) == {"float32"}
  assert floating_dtypes(new_state.opt_state) == {"float32"}
  assert floating_dtypes(metrics) == {"float32"}

  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(1, state, {"position": 1})
  ckpt.close()
  stored = ocp.StandardCheckpointHandler().metadata(
      tmp_path / "checkpoints" / "1" / "state").tree
  stored_dtypes = {str(leaf.dtype) for leaf in jax.tree.leaves(stored)
                   if hasattr(leaf, "dtype")}
  assert "bfloat16" not in stored_dtypes and "float32" in stored_dtypes
  restored, _ = checkpoint.Checkpointer(str(tmp_path)).restore(state)
  assert floating_dtypes(restored.params) == {"float32"}
  for a, b in zip(jax.tree.leaves(restored.params),
                  jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)


def test_param_dtype_bfloat16_stores_bfloat16_parameters():
  config = avmnist_config("dtype=bfloat16", "param_dtype=bfloat16")
  params = jax.eval_shape(
      lambda: build_model(config).init(
          jax.random.key(0), {k: jnp.zeros(v.shape, v.dtype)
                              for k, v in avmnist_spec().items()}))["params"]
  assert floating_dtypes(params) == {"bfloat16"}


@pytest.mark.parametrize("make_config", [avmnist_config, vit_bert_config],
                         ids=["lenet_concat", "vit_bert_contrastive"])
def test_train_step_multiplies_in_bfloat16(make_config):
  def lowered_text(config):
    model, tx, spec, step = train_step_parts(config)
    return jax.jit(step).lower(abstract_state(model, tx, spec),
                               spec).as_text()

  found = matmul_dtypes(lowered_text(make_config("dtype=bfloat16")))
  assert "bf16" in found["dot_general"] and "bf16" in found["convolution"]
  # The float32 default lowers no bfloat16 at all.
  assert "bf16" not in lowered_text(make_config())


def test_contrastive_outputs_are_float32():
  config = vit_bert_config("dtype=bfloat16")
  model = build_model(config)
  batch = {"image": np.zeros((2, 16, 16, 3), np.uint8),
           "text": np.ones((2, 6), np.int32)}
  out = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), batch)[0])
  assert {k: str(v.dtype) for k, v in out.items()} == {
      "embedding/image": "float32", "embedding/text": "float32",
      "log_scale": "float32", "bias": "float32"}


ENCODERS = {"image": {"name": "lenet", "features": 2, "extra_layers": 1,
                      "final_pool": False},
            "audio": {"name": "lenet", "features": 2, "extra_layers": 1,
                      "final_pool": False}}
FUSION_KWARGS = {
    "early": {"encoder": ENCODERS["audio"]},
    "cross_attention": contract.ATTENTION,
    "coattention": dict(contract.ATTENTION, layers="C"),
    "mult": dict(contract.ATTENTION, self_layers=1),
    "perceiver": dict(dim=8, num_heads=2, num_layers=1, num_latents=4),
    "bottleneck": dict(dim=8, num_heads=2, num_layers=1, fusion_layer=0),
    "tensor": dict(dim=3), "low_rank_tensor": dict(rank=2, out_dim=8),
    "weighted": dict(dim=8), "late": dict(), "hybrid": dict()}


@pytest.mark.parametrize("fusion", [*FUSIONS, contract.CUSTOM])
def test_every_fusion_runs_in_bfloat16_with_float32_logits(fusion):
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 255, (3, 12, 12, 1), dtype=np.uint8),
           "audio": rng.integers(0, 255, (3, 16, 16, 1), dtype=np.uint8),
           "mask/image": np.array([True, True, False]),
           "mask/audio": np.array([True, False, True])}
  kwargs = dict(modalities=("image", "audio"), encoders=ENCODERS,
                fusion=fusion, num_classes=3, head_hidden=(4,),
                fusion_kwargs=FUSION_KWARGS.get(fusion))
  bf16 = build_classifier(**kwargs, dtype="bfloat16")
  f32 = build_classifier(**kwargs)
  # The same random parameters for both (float32, as training keeps them).
  variables = contract.random_params(f32, batch)
  assert floating_dtypes(variables) == {"float32"}
  assert (jax.tree.structure(jax.eval_shape(bf16.init, jax.random.key(0),
                                            batch))
          == jax.tree.structure(jax.eval_shape(f32.init, jax.random.key(0),
                                               batch)))

  @jax.jit
  def forward(variables):
    return bf16.apply(variables, batch), f32.apply(variables, batch)

  low, full = forward(variables)
  assert low.dtype == jnp.float32 and low.shape == (3, 3)
  assert np.all(np.isfinite(low))
  # bfloat16 keeps about 3 significant digits per operation.
  scale = float(np.max(np.abs(full))) + 1.0
  np.testing.assert_allclose(low, full, atol=0.05 * scale)


def test_logmel_computes_in_float32_and_returns_the_compute_dtype():
  waveform = np.random.default_rng(0).normal(size=(2, 800)).astype(np.float32)
  full = LogMelSpectrogram(n_mels=16).apply({}, waveform)
  low = LogMelSpectrogram(n_mels=16, dtype=jnp.bfloat16).apply({}, waveform)
  assert full.dtype == jnp.float32 and low.dtype == jnp.bfloat16
  np.testing.assert_array_equal(low, full.astype(jnp.bfloat16))


@pytest.mark.parametrize("key,value", [("dtype", "float8"),
                                       ("param_dtype", "int8"),
                                       ("dtype", "fp32")])
def test_unknown_dtype_is_a_usage_error_naming_the_key(key, value):
  config = avmnist_config(f"{key}={value}")
  with pytest.raises(UsageError, match=f"unknown {key} '{value}'"):
    experiment.check_config(config)


def test_dtype_names():
  assert precision.dtype_of("bfloat16") == jnp.bfloat16
  with pytest.raises(ValueError, match="known: bfloat16, float16, float32"):
    precision.dtype_of("half")
  x = jnp.ones(3)
  assert precision.to_compute(x, jnp.bfloat16).dtype == jnp.bfloat16
  assert precision.to_compute(jnp.ones(3, jnp.int32),
                              jnp.bfloat16).dtype == jnp.int32
  out = precision.to_float32({"a": jnp.ones(2, jnp.bfloat16),
                              "b": jnp.ones(2, bool)})
  assert out["a"].dtype == jnp.float32 and out["b"].dtype == jnp.bool_
