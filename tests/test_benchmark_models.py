"""The PyTorch twins of the benchmarks (benchmarks/torch_transformers.py) are
mmjax's architectures: given mmjax's parameters, tiny versions of the
contrastive towers and of the token fusions give mmjax's outputs."""

import pathlib
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import experiment, objectives

torch = pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import contrastive_step  # noqa: E402  pylint: disable=wrong-import-position
import fusion_step  # noqa: E402  pylint: disable=wrong-import-position
import lenet_layers  # noqa: E402  pylint: disable=wrong-import-position
import torch_transformers  # noqa: E402  pylint: disable=wrong-import-position

# The twins agree to ~1e-6 in float32; at 1e-4 the tanh-approximate GELU
# (instead of mmjax's exact one) would still pass the embeddings.
TOLERANCE = 1e-5
TINY_VIT = {"name": "vit", "width": 32, "depth": 2, "mlp_dim": 64,
            "num_heads": 2, "patch_size": 8, "pool": "gap"}
TINY_BERT = {"name": "bert", "vocab_size": 100, "hidden_size": 32,
             "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 8, "pool": "mean"}


@pytest.fixture(autouse=True)
def _in_repository(monkeypatch):
  monkeypatch.chdir(ROOT)  # the benchmarks load configs/ by relative path


def _init(model, batch):
  """Random parameters of `model`'s shapes (biases, scales and embeddings
  included, so that each is checked; flax's initialisers would leave the
  biases 0) and mmjax's outputs on `batch` with them."""
  shapes = jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b),
                          batch)["params"]
  rng = np.random.default_rng(0)
  params = flax.traverse_util.path_aware_map(
      lambda path, x: (path[-1] == "scale") + 0.1 * rng.standard_normal(
          x.shape).astype(np.float32), shapes)
  outputs = jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch)
  return params, jax.device_get(outputs)


def _check_decay(config, params, twin):
  """The twin's AdamW decays as many weights as mmjax's `no_decay` mask."""
  mask = experiment.decay_mask(config.optimizer.no_decay)(params)
  decayed = sum(x.size for x, m in zip(jax.tree.leaves(params),
                                       jax.tree.leaves(mask)) if m)
  step = torch_transformers.TorchStep(twin, None, None)
  groups = {g["weight_decay"]: sum(p.numel() for p in g["params"])
            for g in step.optimizer.param_groups}
  assert groups[1e-4] == decayed
  assert groups[0.0] == step.num_params - decayed


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - b.detach().numpy())))


def test_contrastive_twin_matches_mmjax():
  """Embeddings and both losses (the objective only sets the initial logit
  scale and bias, which are copied)."""
  encoders = {"image": TINY_VIT, "text": TINY_BERT}
  config = contrastive_step.make_config("sigmoid", 4, encoders, 16)
  model = experiment.build_model(config)
  batch = contrastive_step.make_batch(4, 32, 8, TINY_BERT["vocab_size"])
  assert (batch["text"] == 0).any() and (batch["text"] != 0).any()
  params, outputs = _init(model, batch)

  twin = torch_transformers.contrastive_model(encoders, 32, 16, "sigmoid")
  assert sum(p.numel() for p in twin.parameters()) == sum(
      x.size for x in jax.tree.leaves(params))
  torch_transformers.load_flax_params(twin, params)
  _check_decay(config, params, twin)
  with torch.no_grad():
    twin_outputs = twin({"image": torch.from_numpy(batch["image"]),
                         "text": torch.from_numpy(batch["text"]).long()})
    twin_losses = {name: float(loss_fn(twin_outputs)) for name, loss_fn
                   in torch_transformers.CONTRASTIVE_LOSSES.items()}
  for key in ("embedding/image", "embedding/text"):
    assert _max_diff(outputs[key], twin_outputs[key]) < TOLERANCE, key
  for objective, twin_loss in twin_losses.items():
    loss, _ = objectives.make_objective(objective, None)(
        jax.tree.map(jnp.asarray, outputs), batch)
    assert abs(float(loss) - twin_loss) < TOLERANCE, objective


@pytest.mark.parametrize("fusion,kwargs", [
    ("perceiver", {"dim": 32, "num_latents": 4, "num_layers": 2,
                   "num_heads": 2}),
    ("coattention", {"dim": 32, "num_heads": 2, "layers": "TCT",
                     "mlp_dim": 64}),
])
def test_fusion_twin_matches_mmjax(fusion, kwargs):
  tokens = {"image": (5, 12), "audio": (7, 20)}
  config = fusion_step.make_config(fusion, 4, kwargs)
  model = experiment.build_model(config)
  batch = fusion_step.make_batch(4, tokens)
  batch["mask/image"][0] = False  # example 0 without its image, 1 its audio
  batch["mask/audio"][1] = False
  params, logits = _init(model, batch)

  twin = fusion_step.torch_model(fusion, config, tokens)
  assert sum(p.numel() for p in twin.parameters()) == sum(
      x.size for x in jax.tree.leaves(params))
  torch_transformers.load_flax_params(twin, params)
  _check_decay(config, params, twin)
  with torch.no_grad():
    twin_logits = twin({k: torch.from_numpy(v) for k, v in batch.items()
                        if k != "label"})
  assert _max_diff(logits, twin_logits) < TOLERANCE


def test_lenet_layer_benchmark_times_the_same_operations():
  """benchmarks/lenet_layers.py: each layer's forward, input gradient and
  filter gradient are the same numbers in both frameworks (NHWC / NCHW)."""
  rng = np.random.default_rng(0)
  nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)
  for x_shape, w_shape in lenet_layers.layer_shapes(batch=2):
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=w_shape).astype(np.float32)
    ours = lenet_layers.mmjax_ops(x, w)
    theirs = lenet_layers.torch_ops(torch, x, w)
    expected = {"forward": nchw, "input_grad": nchw,
                "filter_grad": lambda a: np.asarray(a).transpose(3, 2, 0, 1)}
    for op, (fn, args) in ours.items():
      got = theirs[op]()
      got = got if op == "forward" else got[op == "filter_grad"]
      want = expected[op](fn(*args))
      np.testing.assert_allclose(got.numpy(), want, rtol=1e-4,
                                 atol=1e-4 * np.abs(want).max(), err_msg=op)
