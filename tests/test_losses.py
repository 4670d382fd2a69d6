"""Tests for the contrastive losses (CLIP/ALIGN softmax, SigLIP sigmoid)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mmjax import losses

BATCH, DIM = 16, 8
LOG_SCALE = float(np.log(10.0))
BIAS = -10.0


def _inputs(seed=0):
  rng = np.random.RandomState(seed)
  # Different norms per row: the losses must normalise them away.
  x = rng.randn(BATCH, DIM) * rng.uniform(0.5, 3.0, (BATCH, 1))
  y = rng.randn(BATCH, DIM) * rng.uniform(0.5, 3.0, (BATCH, 1))
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def _np_logits(x, y, scale, bias=0.0):
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  y = y / np.linalg.norm(y, axis=1, keepdims=True)
  return scale * x @ y.T + bias


def _np_log_softmax(z):
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _np_log_sigmoid(z):
  return -np.logaddexp(0.0, -z)


def _mesh(num_devices, axis_type=AxisType.Explicit):
  return jax.make_mesh((num_devices,), ("data",), axis_types=(axis_type,),
                       devices=jax.devices()[:num_devices])


def _value_and_grads(fn, num_scalars):
  """jit(value_and_grad) of fn(x, y, *scalars)[0] w.r.t. every argument."""
  return jax.jit(jax.value_and_grad(lambda *a: fn(*a)[0],
                                    argnums=tuple(range(2 + num_scalars))))


def _assert_close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_device_count():
  assert jax.device_count() == 8


def test_softmax_matches_numpy():
  x, y = _inputs()
  log_scale = np.log(1 / 0.07)
  loss, metrics = losses.softmax_contrastive_loss(x, y, jnp.float32(log_scale))
  logits = _np_logits(x, y, 1 / 0.07)
  rows = -np.diag(_np_log_softmax(logits)).mean()
  cols = -np.diag(_np_log_softmax(logits.T)).mean()
  _assert_close(loss, 0.5 * (rows + cols))
  _assert_close(metrics["loss"], loss)
  _assert_close(metrics["scale"], 1 / 0.07)
  _assert_close(metrics["accuracy"],
                np.mean(logits.argmax(1) == np.arange(BATCH)))


def test_sigmoid_matches_numpy():
  x, y = _inputs()
  loss, metrics = losses.sigmoid_contrastive_loss(
      x, y, jnp.float32(LOG_SCALE), jnp.float32(BIAS))
  logits = _np_logits(x, y, 10.0, BIAS)
  labels = 2 * np.eye(BATCH) - 1
  _assert_close(loss, -_np_log_sigmoid(labels * logits).sum() / BATCH)
  _assert_close(metrics["scale"], 10.0)
  _assert_close(metrics["bias"], BIAS)


@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_losses_ignore_embedding_norms(name):
  x, y = _inputs()
  if name == "softmax":
    fn = lambda a, b: losses.softmax_contrastive_loss(a, b, jnp.float32(2.))[0]
  else:
    fn = lambda a, b: losses.sigmoid_contrastive_loss(
        a, b, jnp.float32(LOG_SCALE), jnp.float32(BIAS))[0]
  _assert_close(fn(3.0 * x, 0.25 * y), fn(x, y))


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_sharded_equals_single_device(name, axis_type):
  """Loss and gradients over an 8-device data mesh equal one device's."""
  x, y = _inputs(1)
  if name == "softmax":
    fn, scalars = losses.softmax_contrastive_loss, (jnp.float32(2.5),)
  else:
    fn = losses.sigmoid_contrastive_loss
    scalars = (jnp.float32(LOG_SCALE), jnp.float32(BIAS))
  step = _value_and_grads(fn, len(scalars))
  one = jax.devices()[0]
  value, grads = step(jax.device_put(x, one), jax.device_put(y, one), *scalars)
  sharding = NamedSharding(_mesh(8, axis_type), P("data"))
  xs, ys = jax.device_put(x, sharding), jax.device_put(y, sharding)
  sharded_value, sharded_grads = step(xs, ys, *scalars)
  assert len(sharded_grads[0].sharding.device_set) == 8
  _assert_close(sharded_value, value)
  for got, want in zip(sharded_grads, grads):
    _assert_close(got, want)
  assert all(np.any(np.asarray(g) != 0) for g in grads)


@pytest.mark.parametrize("num_devices", [8, 2, 1])
def test_ring_equals_global_sigmoid(num_devices):
  x, y = _inputs(2)
  scalars = (jnp.float32(LOG_SCALE + 0.3), jnp.float32(BIAS + 2.0))
  value, grads = _value_and_grads(losses.sigmoid_contrastive_loss, 2)(
      x, y, *scalars)
  mesh = _mesh(num_devices)
  ring = _value_and_grads(
      lambda *a: losses.sigmoid_contrastive_loss_ring(*a, mesh), 2)
  sharding = NamedSharding(mesh, P("data"))
  ring_value, ring_grads = ring(jax.device_put(x, sharding),
                                jax.device_put(y, sharding), *scalars)
  _assert_close(ring_value, value)
  for got, want in zip(ring_grads, grads):
    _assert_close(got, want)
  _, metrics = losses.sigmoid_contrastive_loss_ring(x, y, *scalars, mesh)
  _assert_close(metrics["loss"], value)
  _assert_close(metrics["scale"], np.exp(LOG_SCALE + 0.3))


def test_ring_never_materialises_full_logits():
  """The global loss builds a [B, B] array; the ring (with grads) does not."""
  x, y = _inputs()
  mesh = _mesh(8)
  sharding = NamedSharding(mesh, P("data"))
  xs, ys = jax.device_put(x, sharding), jax.device_put(y, sharding)
  scalars = (jnp.float32(LOG_SCALE), jnp.float32(BIAS))
  full = f"tensor<{BATCH}x{BATCH}xf32>"
  global_ir = _value_and_grads(losses.sigmoid_contrastive_loss, 2).lower(
      x, y, *scalars).as_text()
  assert full in global_ir
  ring_ir = _value_and_grads(
      lambda *a: losses.sigmoid_contrastive_loss_ring(*a, mesh), 2).lower(
          xs, ys, *scalars).as_text()
  assert full not in ring_ir
  assert "collective_permute" in ring_ir


def test_softmax_scale_is_not_cut_off_in_the_loss():
  """CLIP bounds the scale by clamping the parameter after each step
  (`experiment.clamp_parameters`); the loss itself keeps its gradient."""
  x, y = _inputs()
  step = _value_and_grads(losses.softmax_contrastive_loss, 1)
  _, metrics = losses.softmax_contrastive_loss(x, y, jnp.float32(5.0))
  _assert_close(metrics["scale"], np.exp(5.0))
  _, grads = step(x, y, jnp.float32(5.0))
  assert float(grads[2]) != 0.0