"""Gradient accumulation in the jitted train step (config.grad_accum_steps).

The global batch of B examples is cut into k = `grad_accum_steps`
microbatches of b = B / k, so that the step holds the activations of b
examples instead of B; the optimizer still takes one step per global batch
(the step counter advances once per B, the train state keeps its shapes, so
checkpoints and exact resume are as with k = 1). `gradient_fn` chooses the
gradient function once, for k and the kind of objective:

  k = 1          `full_batch`: one forward and backward pass over the batch
                 (the trainer's step without accumulation).
  per-example    `microbatched` (objectives "supervised", "captioning"): a
  losses         `jax.lax.scan` over the k microbatches computes each one's
                 loss and gradients and carries their sum; the gradient is
                 sum / k, the mean of the microbatches' gradients of their
                 mean losses, which is the full batch's gradient for a loss
                 that averages over examples. A loss that averages over
                 something else (captioning: target tokens, of which the
                 microbatches hold different numbers) names it
                 (`objectives.loss_weight`): the gradient is then
                 sum_j w_j g_j / sum_j w_j, microbatch j's gradient g_j
                 weighed by its count w_j, again the full batch's.
  contrastive    `cached_embeddings` (objectives softmax, sigmoid,
  losses         sigmoid_ring: `objectives.whole_batch`): an example's loss
                 depends on the whole global batch (its negatives), so a
                 microbatch cannot be scored alone. GradCache (Gao, Zhang,
                 Han and Callan, "Scaling Deep Contrastive Learning Batch
                 Size under Memory Limited Setup", RepL4NLP 2021; open_clip's
                 `accum_freq`), in three parts:
                   1. a scan computes every microbatch's outputs
                      ("embedding/<m>" [b, D], "log_scale" [], "bias" [])
                      without gradients, so no activations are kept; the
                      cache is the global batch's embeddings [B, D];
                   2. the loss over the whole global batch and its gradient
                      with respect to the cache: d embedding/<m> [B, D],
                      d log_scale [], d bias [];
                   3. a scan recomputes each microbatch's forward under
                      `jax.vjp` and pulls its rows of the cached gradients
                      [b, D] back to the parameters, summing the parameter
                      gradients.
                 The loss and gradients are the full batch's, at the cost
                 of a second forward pass. An objective that is a
                 whole-batch term plus a per-example one (CoCa) may name
                 the outputs its whole-batch term reads
                 (`objectives.CacheSplit`): only those are cached, and the
                 per-example term is computed in part 3, each microbatch's
                 weighed by its share of what the term averages over.

Every gradient function has the signature

  grad_fn(forward, objective, params, batch, rng)
      -> (grads, (metrics, updates, outputs))

  forward(params, batch, rng) -> (outputs, updates): the model in training
    mode on a batch [N, ...] (the global batch or a microbatch); updates are
    its mutable collections {"batch_stats": ..., "intermediates": ...}.
  objective(outputs, batch) -> (scalar loss, metrics dict).
  batch: {key: [B, ...]}, sharded along B over the mesh's batch axes.
  rng: the step's key; microbatch j draws with `fold_in(rng, j)` (so its
    dropout masks are not those of k = 1), in both passes of the
    contrastive scheme, so a recomputed forward matches the cached one.
  grads: the parameters' tree; metrics: the objective's on the whole batch;
    updates and outputs: as forward's for the global batch [B, ...].

Microbatches. The batch is sharded over the n blocks of the mesh's batch
axes (`parallel.batch_axes`: data, or data x fsdp), each holding L = B / n
consecutive rows; microbatch j takes rows j L/k ...
(j + 1) L/k - 1 of every device's block (`split_batch`), so cutting
[B, ...] into [k, b, ...] moves no data between devices and every microbatch
is split evenly over all of them. B must be divisible by k * n (checked at
config time: `experiment.check_config`).

What the step returns besides the gradients:
  outputs, intermediates  the microbatches' merged back into the global
      batch's order (`merge_microbatches`), for the methods' hooks
      (`mmjax.methods`): a leaf whose leading axis is the microbatch's b
      examples is concatenated [k, b, ...] -> [B, ...]; any other leaf is
      batch-independent (the logit scale) and taken from microbatch 0. So
      `transform_grads` sees the whole batch's outputs and the accumulated
      gradients, and OGM-GE (scores summed over the batch's examples) and
      G-Blending (loss weights, the same in every microbatch) work as with
      k = 1.
  metrics  the objective on the merged outputs and the whole batch, so the
      loss and accuracies are the full batch's (a unimodal head's metrics
      count each example that has its modality once, whichever microbatch
      holds it).
  batch_stats  BatchNorm normalises each microbatch with that microbatch's
      statistics (the usual behaviour of accumulation, as in PyTorch); the
      running averages returned are the mean over the microbatches of each
      one's update from the state's averages. The mean then moves exactly as
      with the full batch (the mean of the microbatch means), the variance
      by the mean of the microbatch variances (smaller than the full batch's
      by the variance of the microbatch means), and the averages take one
      momentum step per optimizer step, as with k = 1 (chaining them through
      the microbatches would take k).

Cost. Activation memory is that of b examples (for the contrastive scheme,
plus the cache of B embeddings); the gradient accumulator is one more copy of
the parameters' shapes. Under data parallelism XLA all-reduces each
microbatch's gradients inside the loop, so a step communicates k times the
gradients instead of once.

Exactness. Without BatchNorm and dropout, the loss and gradients equal the
full batch's up to float rounding (tests/test_accumulate.py). One deviation
remains for the supervised loss: a unimodal head's loss averages over the
examples of its microbatch that have its modality, so under modality
dropout or missing modalities, when the microbatches hold different numbers
of such examples, the gradient (the mean over microbatches) weighs them a
little differently from the full batch's; with every modality present it is
exact.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import parallel


def gradient_fn(steps: int, *, whole_batch: bool = False, loss_weight=None,
                split=None, mesh=None):
  """The train step's gradient function (module docstring) for `steps`
  microbatches; `whole_batch` for an objective whose loss couples every
  example with the whole batch (`objectives.whole_batch`); `loss_weight`
  (batch -> scalar) for one whose loss is a mean over another count
  (`objectives.loss_weight`); `split` how a whole-batch objective comes
  apart into a cached whole-batch term and a per-example one
  (`objectives.cache_split`); `mesh` the trainer's, whose batch axes the
  batch is sharded over (None: one device)."""
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"grad_accum_steps must be a positive int, got {steps!r}")
  if steps == 1:
    return full_batch
  if whole_batch:
    return functools.partial(cached_embeddings, steps=steps, mesh=mesh,
                             split=split)
  return functools.partial(microbatched, steps=steps, mesh=mesh,
                           loss_weight=loss_weight)


def full_batch(forward, objective, params, batch, rng):
  """One forward and backward pass over the whole batch (k = 1)."""
  def loss_fn(params):
    outputs, updates = forward(params, batch, rng)
    loss, metrics = objective(outputs, batch)
    return loss, (metrics, updates, outputs)

  return jax.grad(loss_fn, has_aux=True)(params)


def microbatched(forward, objective, params, batch, rng, *, steps: int,
                 mesh=None, loss_weight=None):
  """Gradients summed over `steps` microbatches by a scan, divided by
  `steps`: the full batch's for a loss that is a mean over examples; with
  `loss_weight`, each microbatch's weighed by its count and divided by the
  counts' sum."""
  micro = split_batch(batch, steps, mesh)  # {key: [k, b, ...]}
  b = _microbatch_size(batch, steps)

  def loss_fn(params, batch, rng):
    outputs, updates = forward(params, batch, rng)
    return objective(outputs, batch)[0], (outputs, updates)

  def add_microbatch(carry, xs):  # forward and backward of b examples
    total, count = carry
    j, batch_j = xs
    grads, aux = jax.grad(loss_fn, has_aux=True)(
        params, batch_j, jax.random.fold_in(rng, j))
    w = 1.0 if loss_weight is None else loss_weight(batch_j).astype(
        jnp.float32)
    return (jax.tree.map(lambda t, g: t + w * g, total, grads),
            count + w), aux

  (total, count), (outputs, updates) = jax.lax.scan(
      add_microbatch, (jax.tree.map(jnp.zeros_like, params), jnp.float32(0)),
      (jnp.arange(steps), micro))
  grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), total)
  outputs = merge_microbatches(outputs, b, mesh)
  _, metrics = objective(outputs, batch)
  return grads, (metrics, _combine_updates(updates, b, mesh), outputs)


def cached_embeddings(forward, objective, params, batch, rng, *, steps: int,
                      mesh=None, split=None):
  """GradCache (module docstring): the outputs of every microbatch first,
  the loss and its gradient over the whole batch, then each microbatch's
  parameter gradients from its rows of the outputs' gradient.

  `split` (`objectives.CacheSplit`, or None: cache every output): the cache
  holds only `split.cached`, the whole-batch term is scored on it, and the
  per-example term `split.local` is computed in the second pass, microbatch
  j's loss weighed by its share w_j / sum w of `split.local_weight`.
  """
  micro = split_batch(batch, steps, mesh)  # {key: [k, b, ...]}
  b = _microbatch_size(batch, steps)
  keys = jnp.arange(steps)
  keep = ((lambda o: {k: o[k] for k in split.cached}) if split else
          (lambda o: o))
  whole = split.whole if split else (lambda o, batch: objective(o, batch))
  if split:
    counts = jax.vmap(split.local_weight)(micro).astype(jnp.float32)
    shares = counts / jnp.maximum(counts.sum(), 1.0)
  else:
    shares = jnp.zeros((steps,))

  def embed(_, xs):  # pass 1: no gradients, so no activations are kept
    j, batch_j = xs
    return None, keep(forward(params, batch_j, jax.random.fold_in(rng, j))[0])

  _, cached = jax.lax.scan(embed, None, (keys, micro))  # leaves [k, ...]
  outputs = merge_microbatches(cached, b, mesh)
  loss, pullback, metrics = jax.vjp(lambda o: whole(o, batch), outputs,
                                    has_aux=True)
  (d_outputs,) = pullback(jnp.ones_like(loss))
  d_micro = _split_cotangents(d_outputs, cached, b, mesh)

  def pull(total, xs):  # pass 2: recompute, pull the cached gradients back
    j, batch_j, d_j, share = xs

    def recompute(p):
      outputs_j, updates = forward(p, batch_j, jax.random.fold_in(rng, j))
      local_loss, local_metrics = (split.local(outputs_j, batch_j) if split
                                   else (jnp.zeros(()), {}))
      return (keep(outputs_j), share * local_loss), (updates, local_metrics)

    (outputs_j, local_loss), vjp, (updates, local_metrics) = jax.vjp(
        recompute, params, has_aux=True)
    leaves, treedef = jax.tree.flatten(outputs_j)
    d_j = [np.zeros(x.shape, jax.dtypes.float0) if d is None else d
           for d, x in zip(d_j, leaves)]
    (grads,) = vjp((jax.tree.unflatten(treedef, d_j), jnp.ones(())))
    return jax.tree.map(jnp.add, total, grads), (updates, local_loss,
                                                 local_metrics)

  grads, (updates, local_losses, local_metrics) = jax.lax.scan(
      pull, jax.tree.map(jnp.zeros_like, params),
      (keys, micro, d_micro, shares))
  if split:  # the microbatches' token means -> the batch's
    local_metrics = jax.tree.map(lambda m: jnp.sum(shares * m), local_metrics)
    metrics = split.combine(loss, metrics, jnp.sum(local_losses),
                            local_metrics)
  return grads, (metrics, _combine_updates(updates, b, mesh), outputs)


# ------------------------------------------------------------- reshaping ---


def _microbatch_size(batch, steps: int) -> int:
  return jax.tree.leaves(batch)[0].shape[0] // steps


def _data_size(mesh) -> int:
  """How many blocks the batch is split into (data x fsdp; 1 without a
  mesh)."""
  return 1 if mesh is None else parallel.batch_shards(mesh)


def _batch_axis(mesh):
  """The PartitionSpec entry of the batch axes (`parallel.batch_axis`)."""
  return None if mesh is None else parallel.batch_axis(mesh)


def _constrain(x, mesh, spec):
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def split_batch(batch, steps: int, mesh=None):
  """{key: [B, ...]} -> {key: [k, b, ...]}, b = B / k: microbatch j holds
  rows j L/k ... (j + 1) L/k - 1 of each device's L = B / n rows, so each
  is split evenly over the n batch shards of the mesh without moving data.
  """
  n = _data_size(mesh)

  def split(x):
    size = x.shape[0]
    if size % (steps * n):
      raise ValueError(
          f"grad_accum_steps={steps}: the batch of {size} is not divisible "
          f"into {steps} microbatches split over {n} devices")
    x = x.reshape(n, steps, size // (n * steps), *x.shape[1:])
    x = jnp.swapaxes(x, 0, 1).reshape(steps, size // steps, *x.shape[3:])
    return _constrain(x, mesh, P(None, _batch_axis(mesh)))

  return jax.tree.map(split, batch)


def _per_example(x, b: int) -> bool:
  """Whether a stacked leaf [k, ...] has the microbatch's b examples on its
  second axis."""
  return x.ndim >= 2 and x.shape[1] == b


def merge_microbatches(tree, b: int, mesh=None):
  """The inverse of `split_batch` for stacked scan outputs: each leaf
  [k, b, ...] -> [B, ...] in the global batch's order; a leaf without the
  microbatch's b examples on its second axis (batch-independent) -> its
  microbatch 0 value."""
  n = _data_size(mesh)

  def merge(x):
    if not _per_example(x, b):
      return x[0]
    k = x.shape[0]
    x = x.reshape(k, n, b // n, *x.shape[2:])
    x = jnp.swapaxes(x, 0, 1).reshape(k * b, *x.shape[3:])
    return _constrain(x, mesh, P(_batch_axis(mesh)))

  return jax.tree.map(merge, tree)


def _split_cotangents(d_outputs, cached, b: int, mesh):
  """The outputs' gradient over the whole batch, per microbatch: a list in
  the order of the flattened outputs of leaves [k, b, ...] (rows of the
  per-example leaves; a batch-independent leaf's gradient goes to
  microbatch 0 alone, since the cache holds microbatch 0's value) and None
  for integer outputs, which take no gradient."""
  cached_leaves = jax.tree.leaves(cached)
  steps = cached_leaves[0].shape[0]
  out = []
  for d, x in zip(jax.tree.leaves(d_outputs), cached_leaves):
    if d.dtype == jax.dtypes.float0:
      out.append(None)
    elif _per_example(x, b):
      out.append(split_batch(d, steps, mesh))
    else:
      out.append(jnp.zeros((steps, *d.shape), d.dtype).at[0].set(d))
  return out


def _combine_updates(updates: dict, b: int, mesh) -> dict:
  """Stacked per-microbatch mutable collections -> the step's: BatchNorm
  running averages the mean over microbatches, every other collection
  (the sown intermediates) merged into the global batch."""
  updates = dict(updates)
  if "batch_stats" in updates:
    updates["batch_stats"] = jax.tree.map(lambda x: jnp.mean(x, axis=0),
                                          updates["batch_stats"])
  return {key: value if key == "batch_stats" else
          merge_microbatches(value, b, mesh) for key, value in updates.items()}
