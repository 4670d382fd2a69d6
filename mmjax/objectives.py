"""Objectives: model outputs and batch -> (scalar loss, metrics).

  supervised    softmax cross-entropy of the classifier's logits, plus the
                weighted cross-entropies of its unimodal heads if it has any.
  softmax       CLIP / ALIGN contrastive loss between towers.
  sigmoid       SigLIP pairwise sigmoid loss between towers.
  sigmoid_ring  SigLIP computed blockwise around a ring of devices
                (`shard_map` + `ppermute`), never holding the [B, B] logits.
  captioning    next-token cross-entropy of a generative model's logits
                (`mmjax.models.generative`), averaged over the target tokens.
  coca          CoCa's contrastive plus captioning loss
                (`mmjax.models.coca.coca_objective`).

The contrastive objectives read `outputs["embedding/<m>"]` [B, D] for every
modality and average the loss over all pairs of towers (one pair for two
towers; N-tower models as in Tian et al., "Contrastive Multiview Coding",
ECCV 2020). They run on global arrays inside `jax.jit`, so the negatives are
the whole global batch across devices (sigmoid_ring passes blocks around
all the batch shards of the mesh, data x fsdp: `parallel.batch_axis`). Their functions carry
`whole_batch = True` (`whole_batch(objective)`): an example's loss depends on
every other example of the batch, so gradient accumulation must score the
whole batch at once (`mmjax.accumulate`), while the supervised loss is a mean
over examples that microbatches can compute piecewise.
"""

import dataclasses
import functools
import itertools
from collections.abc import Callable

import jax.numpy as jnp
import optax

from mmjax import losses, parallel


def supervised(outputs, batch: dict, weights: dict | None = None):
  """Softmax cross-entropy with integer labels, averaged over the batch.

  outputs: the logits [B, K], or the dict of a model with unimodal heads
    ("logits" [B, K], "unimodal_logits/<m>" [B, K], "unimodal_present/<m>"
    [B] bool; `MultimodalClassifier.unimodal_heads`).
  batch["label"]: [B] int.
  weights: per-head loss weights {"fused": w, "<m>": w_m}; a missing entry
    weighs 1 (a probe head's loss only reaches the probe, so weight 1 leaves
    the rest of the model alone; G-Blending passes its blend weights). A
    weight that is the Python number 0 leaves the head out of the loss.

  Returns (loss, metrics). Logits alone: loss = CE(logits) and metrics
  {"loss", "accuracy"}. With heads: loss = w_fused CE(logits) + sum_m w_m
  CE_m, where CE_m averages over the examples that have modality m; metrics
  add "fused_loss" and "unimodal/<m>/loss", "unimodal/<m>/accuracy" (both
  over the examples with m).
  """
  labels = batch["label"]
  if not isinstance(outputs, dict):
    loss = optax.softmax_cross_entropy_with_integer_labels(outputs,
                                                           labels).mean()
    accuracy = jnp.mean(jnp.argmax(outputs, -1) == labels)
    return loss, {"loss": loss, "accuracy": accuracy}
  weights = weights or {}
  fused_loss, metrics = supervised(outputs["logits"], batch)
  loss = weights.get("fused", 1.0) * fused_loss
  metrics = {"accuracy": metrics["accuracy"], "fused_loss": fused_loss}
  prefix = "unimodal_logits/"
  for key in sorted(k for k in outputs if k.startswith(prefix)):
    m = key[len(prefix):]
    present = outputs[f"unimodal_present/{m}"].astype(jnp.float32)
    count = jnp.maximum(present.sum(), 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(outputs[key], labels)
    head_loss = jnp.sum(ce * present) / count
    correct = jnp.argmax(outputs[key], -1) == labels
    metrics[f"unimodal/{m}/loss"] = head_loss
    metrics[f"unimodal/{m}/accuracy"] = jnp.sum(correct * present) / count
    weight = weights.get(m, 1.0)
    if not (isinstance(weight, (int, float)) and weight == 0):
      loss = loss + weight * head_loss
  metrics["loss"] = loss
  return loss, metrics


def captioning(outputs, batch: dict, weights=None):
  """Next-token cross-entropy over the real target tokens.

  outputs["logits"]: float32 [B, L, V], the teacher-forced predictions of
    batch["text"] int32 [B, L] (padding id 0 is left out of the mean; the end
    token counts). `weights` must be None.

  Returns (loss, {"loss", "token_accuracy", "perplexity"}), each over the
  batch's target tokens. Under gradient accumulation each microbatch's
  gradient is weighed by its target tokens (`loss_weight`), so the result is
  the full batch's token mean however the tokens fall.
  """
  if weights is not None:
    raise ValueError("the captioning objective takes no head weights")
  targets = batch["text"]
  mask = (targets != 0).astype(jnp.float32)
  count = jnp.maximum(mask.sum(), 1.0)
  ce = optax.softmax_cross_entropy_with_integer_labels(outputs["logits"],
                                                       targets)
  loss = jnp.sum(ce * mask) / count
  correct = jnp.argmax(outputs["logits"], -1) == targets
  return loss, {"loss": loss, "token_accuracy": jnp.sum(correct * mask) / count,
                "perplexity": jnp.exp(loss)}


captioning.loss_weight = lambda batch: jnp.sum(batch["text"] != 0)


def _pairwise(pair_loss, outputs: dict, batch: dict, weights=None):
  """Mean of `pair_loss(x, y, outputs)` over all pairs of embeddings
  (`weights`, the supervised objective's head weights, must be None)."""
  del batch
  if weights is not None:
    raise ValueError("contrastive objectives take no head weights")
  names = sorted(k for k in outputs if k.startswith("embedding/"))
  results = [pair_loss(outputs[a], outputs[b], outputs)
             for a, b in itertools.combinations(names, 2)]
  loss = sum(r[0] for r in results) / len(results)
  metrics = {k: sum(r[1][k] for r in results) / len(results)
             for k in results[0][1]}
  return loss, {**metrics, "loss": loss}


def contrastive(name: str, mesh=None):
  """The (outputs, batch) -> (loss, metrics) function of objective `name`."""
  if name == "softmax":
    pair = lambda x, y, o: losses.softmax_contrastive_loss(x, y, o["log_scale"])
  elif name == "sigmoid":
    pair = lambda x, y, o: losses.sigmoid_contrastive_loss(
        x, y, o["log_scale"], o["bias"])
  elif name == "sigmoid_ring":  # the ring over all the batch's shards
    pair = lambda x, y, o: losses.sigmoid_contrastive_loss_ring(
        x, y, o["log_scale"], o["bias"], mesh, parallel.batch_axis(mesh))
  else:
    raise ValueError(f"unknown contrastive objective {name!r}")
  objective = functools.partial(_pairwise, pair)
  objective.whole_batch = True  # the negatives are the whole batch
  return objective


def whole_batch(objective) -> bool:
  """Whether `objective`'s loss couples every example with the whole batch
  (the contrastive objectives; an objective of one's own may set the
  attribute `whole_batch = True` too), so that it cannot be summed over
  microbatches."""
  return bool(getattr(objective, "whole_batch", False))


@dataclasses.dataclass(frozen=True)
class CacheSplit:
  """How GradCache (`mmjax.accumulate.cached_embeddings`) may take apart a
  whole-batch objective whose loss is a whole-batch term plus a per-example
  term (CoCa: contrastive plus captioning), so that only the outputs the
  whole-batch term reads are cached (not, say, [B, L, V] logits):

    cached: the output keys the whole-batch term reads (the cache).
    whole(outputs, batch) -> (loss, metrics): that term, on the cache.
    local(outputs, batch) -> (loss, metrics): the per-example term, a mean
      over `local_weight(batch)` items (tokens), computed per microbatch
      in the second pass; the step's is the weighted mean over microbatches.
    local_weight: batch -> the count `local` averages over.
    combine(whole_loss, whole_metrics, local_loss, local_metrics) -> metrics:
      the objective's metrics (with "loss") from the two terms' (the local
      metrics already averaged over the microbatches).

  An objective offers it as its attribute `cache_split` (`cache_split`).
  """
  cached: tuple[str, ...]
  whole: Callable
  local: Callable
  local_weight: Callable
  combine: Callable


def cache_split(objective) -> CacheSplit | None:
  """`objective`'s `CacheSplit`, or None (GradCache caches every output)."""
  return getattr(objective, "cache_split", None)


def loss_weight(objective):
  """batch -> the count that `objective`'s loss is a mean over, where that
  is not the batch's examples (captioning: its target tokens), or None;
  gradient accumulation weighs each microbatch's gradient by it
  (`mmjax.accumulate.microbatched`). An objective of one's own may set the
  attribute `loss_weight` too."""
  return getattr(objective, "loss_weight", None)


OBJECTIVES = ("supervised", "softmax", "sigmoid", "sigmoid_ring",
              "captioning", "coca")
# The objectives of models that decode text (`mmjax.models.generative.
# generate`): their evaluators see generated tokens.
GENERATIVE = ("captioning", "coca")
PER_EXAMPLE = {"supervised": supervised, "captioning": captioning}


def make_objective(name: str, mesh, **kwargs):
  """The objective function for config key `objective`; `kwargs` (config
  key `objective_kwargs`) are coca's loss weights (caption_weight,
  contrastive_weight)."""
  if name == "coca":  # its module builds on this one
    from mmjax.models.coca import coca_objective  # pylint: disable=import-outside-toplevel
    return coca_objective(**kwargs)
  if kwargs:
    raise ValueError(f"objective {name!r} takes no objective_kwargs")
  return PER_EXAMPLE[name] if name in PER_EXAMPLE else contrastive(name, mesh)


def objective_of(config, mesh):
  """The objective of a run's config: `config.objective` with its
  `objective_kwargs` (`make_objective`)."""
  return make_objective(config.objective, mesh,
                        **config.get("objective_kwargs", {}))
