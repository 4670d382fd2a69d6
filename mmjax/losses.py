"""Contrastive objectives for two-tower training: CLIP/ALIGN and SigLIP.

Every loss takes a batch of paired embeddings x [B, D] and y [B, D] (row i of
x and row i of y are a positive pair; every other pairing is a negative),
L2-normalises them inside (so raw or already-normalised embeddings both
work), computes in float32, and returns `(loss, metrics)` with a scalar loss.

`softmax_contrastive_loss` and `sigmoid_contrastive_loss` are written on
global arrays: under `jax.jit` with x and y sharded along the batch over a
1-D "data" mesh, XLA's partitioner computes them over the global batch across
all devices (with explicit-sharding meshes y is all-gathered first, since a
[B, B] result cannot be sharded along the same axis twice).
`sigmoid_contrastive_loss_ring` is the chunked SigLIP that passes y blocks
around the devices and never materialises the full [B, B] logit matrix.

The learnable temperature parameters (`log_scale`, `bias`) belong to the
model, which initialises them: log(1/0.07) for CLIP; log(10) and -10 for
SigLIP.
"""

import functools
import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def _l2_normalize(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
  """Rows of x [B, D] scaled to unit L2 norm, in float32; a zero row stays 0."""
  x = x.astype(jnp.float32)
  sq_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))


def _replicate_batch(y: jnp.ndarray) -> jnp.ndarray:
  """y [B, D] unsharded when its type carries an explicit batch sharding.

  Under an explicit-sharding mesh, x @ y.T with both operands split along the
  batch would ask for a [B@data, B@data] result, which is illegal; gathering
  y (B x D, small) gives logits [B@data, B]. With auto sharding (or none) the
  type carries no sharding and y is returned unchanged: the partitioner
  decides.
  """
  sharding = jax.typeof(y).sharding
  if any(axis is not None for axis in sharding.spec):
    y = jax.sharding.reshard(y, sharding.update(spec=P(*(None,) * y.ndim)))
  return y


def _axes(axis_name) -> tuple:
  """A mesh axis name or a tuple of them -> the tuple."""
  return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def _split_batch(a: jnp.ndarray, mesh: Mesh, axis_name) -> jnp.ndarray:
  """a [B, ...] resharded along the batch over an explicit-sharding mesh.

  shard_map under an explicit mesh requires its inputs to be sharded as its
  in_specs say; an unsharded array (e.g. in eager code) is split here. With
  an auto-sharding mesh shard_map reshards by itself and `a` is unchanged.
  `axis_name`: a mesh axis or a tuple of them.
  """
  explicit = any(mesh.axis_types[mesh.axis_names.index(name)]
                 == AxisType.Explicit for name in _axes(axis_name))
  spec = jax.typeof(a).sharding.spec
  if explicit and (not spec or _axes(spec[0] or ()) != _axes(axis_name)):
    a = jax.sharding.reshard(a, NamedSharding(mesh, P(axis_name)))
  return a


def _pair_logits(x, y, scale, bias=0.0):
  """scale * normalised(x) @ normalised(y).T + bias: [B, D] x2 -> [B, B]."""
  x = _l2_normalize(x)
  y = _replicate_batch(_l2_normalize(y))
  return scale * (x @ y.T) + bias


def softmax_contrastive_loss(x: jnp.ndarray, y: jnp.ndarray,
                             log_scale: jnp.ndarray):
  """Symmetric softmax (InfoNCE) loss of CLIP and ALIGN.

  Radford et al., "Learning Transferable Visual Models From Natural Language
  Supervision", ICML 2021; Jia et al., "Scaling Up Visual and
  Vision-Language Representation Learning With Noisy Text Supervision",
  ICML 2021. With x, y L2-normalised and scale = exp(log_scale),
  logits = scale * x @ y.T and the loss is the mean of the cross-entropies
  over rows (x -> y) and over columns (y -> x), targets on the diagonal.
  CLIP keeps scale <= 100 by clipping the parameter after each optimizer
  step (open_clip: `logit_scale.clamp_(0, math.log(100))`), not here, so the
  gradient is never cut off: `experiment.build_optimizer` clamps it.

  Args:
    x: [B, D] embeddings of the first tower.
    y: [B, D] embeddings of the second tower, paired row by row with x.
    log_scale: scalar, the learnable log inverse temperature.

  Returns:
    (loss, metrics): scalar loss and {"loss", "scale", "accuracy"} where
    accuracy is the fraction of rows whose argmax is the diagonal (x -> y
    retrieval top-1 in the batch).
  """
  scale = jnp.exp(jnp.asarray(log_scale, jnp.float32))
  logits = _pair_logits(x, y, scale)  # [B, B]
  targets = jnp.eye(logits.shape[0], dtype=logits.dtype)
  rows = optax.softmax_cross_entropy(logits, targets).mean()
  cols = optax.softmax_cross_entropy(logits.T, targets).mean()
  loss = 0.5 * (rows + cols)
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) ==
                      jnp.arange(logits.shape[0]))
  return loss, {"loss": loss, "scale": scale, "accuracy": accuracy}


def _sigmoid_block_loss(x, y, scale, bias, positives_on_diagonal: bool):
  """Summed SigLIP loss of normalised blocks x [b, D] against y [c, D].

  Labels are +1 on the diagonal when `positives_on_diagonal` (b == c), -1
  everywhere else. Returns a scalar sum (not yet divided by the batch).
  """
  logits = scale * (x @ y.T) + bias
  if positives_on_diagonal:
    labels = 2.0 * jnp.eye(x.shape[0], y.shape[0], dtype=logits.dtype) - 1.0
  else:
    labels = -1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def sigmoid_contrastive_loss(x: jnp.ndarray, y: jnp.ndarray,
                             log_scale: jnp.ndarray, bias: jnp.ndarray):
  """Pairwise sigmoid loss of SigLIP on the global batch.

  Zhai, Mustafa, Kolesnikov, Beyer, "Sigmoid Loss for Language Image
  Pre-Training", ICCV 2023, Eq. 2: with x, y L2-normalised,
  logits = exp(log_scale) * x @ y.T + bias, labels z_ij = +1 if i == j else
  -1, and loss = -sum_ij log_sigmoid(z_ij * logits_ij) / B.

  Args:
    x: [B, D] embeddings of the first tower.
    y: [B, D] embeddings of the second tower, paired row by row with x.
    log_scale: scalar log temperature t' (t = exp(t')); the paper starts at
      log 10.
    bias: scalar b; the paper starts at -10.

  Returns:
    (loss, metrics): scalar loss and {"loss", "scale", "bias"}.
  """
  scale = jnp.exp(jnp.asarray(log_scale, jnp.float32))
  bias = jnp.asarray(bias, jnp.float32)
  logits = _pair_logits(x, y, scale, bias)  # [B, B]
  labels = 2.0 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1.0
  loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / x.shape[0]
  return loss, {"loss": loss, "scale": scale, "bias": bias}


def sigmoid_contrastive_loss_ring(x: jnp.ndarray, y: jnp.ndarray,
                                  log_scale: jnp.ndarray, bias: jnp.ndarray,
                                  mesh: Mesh, axis_name="data"):
  """SigLIP loss computed in chunks around a ring of devices.

  The memory-efficient implementation of Zhai et al., "Sigmoid Loss for
  Language Image Pre-Training", ICCV 2023 (Section 3.3, Figure 1). With the
  global batch split into n blocks of b = B / n (n = mesh.shape[axis_name],
  or the product over a tuple of axes)
  examples, each device first scores its local x against its local y
  (positives on the local diagonal), then n - 1 times passes its current y
  block to the next device (`jax.lax.ppermute`) and adds the all-negative
  loss of its x against the block it received. The per-device sums are
  `psum`-ed and divided by B. No device ever holds more than a [b, b] logit
  block; each block's logits are recomputed in the backward pass
  (`jax.checkpoint`), so only the y blocks are kept for it.

  Equal to `sigmoid_contrastive_loss` (value and gradients) on the same
  global batch, up to float rounding.

  Args:
    x: [B, D] embeddings of the first tower; B divisible by the axis size.
      Under jit with an explicit-sharding mesh, x and y should arrive
      sharded as NamedSharding(mesh, P(axis_name)) (or jit should run under
      `jax.set_mesh(mesh)`), as a data-parallel batch does.
    y: [B, D] embeddings of the second tower, paired row by row with x.
    log_scale: scalar log temperature (replicated).
    bias: scalar bias (replicated).
    mesh: the device mesh; x and y are split along the batch over axis_name.
    axis_name: the mesh axis the batch is split over, or a tuple of them
      (("data", "fsdp") on a data x fsdp x model mesh: the ring runs over
      data * fsdp blocks in the order of the batch's sharding, and each
      `model` group computes the same ring on its replica of the blocks).

  Returns:
    (loss, metrics): scalar loss and {"loss", "scale", "bias"}.
  """
  num_blocks = math.prod(mesh.shape[name] for name in _axes(axis_name))
  global_batch = x.shape[0]
  ring = [(i, (i + 1) % num_blocks) for i in range(num_blocks)]
  block_loss = jax.checkpoint(_sigmoid_block_loss, static_argnums=(4,))

  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(P(axis_name), P(axis_name), P(), P()),
                     out_specs=P())
  def ring_loss(x_local, y_local, scale, bias):
    x_local = _l2_normalize(x_local)
    y_block = _l2_normalize(y_local)
    total = block_loss(x_local, y_block, scale, bias, True)

    def step(_, carry):
      total, y_block = carry
      y_block = jax.lax.ppermute(y_block, axis_name, ring)
      return total + block_loss(x_local, y_block, scale, bias, False), y_block

    total, _ = jax.lax.fori_loop(0, num_blocks - 1, step, (total, y_block))
    return jax.lax.psum(total, axis_name) / global_batch

  scale = jnp.exp(jnp.asarray(log_scale, jnp.float32))
  bias = jnp.asarray(bias, jnp.float32)
  loss = ring_loss(_split_batch(x, mesh, axis_name),
                   _split_batch(y, mesh, axis_name), scale, bias)
  return loss, {"loss": loss, "scale": scale, "bias": bias}
