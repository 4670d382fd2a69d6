"""Objectives: model outputs and batch -> (scalar loss, metrics).

  supervised    softmax cross-entropy of the classifier's logits.
  softmax       CLIP / ALIGN contrastive loss between towers.
  sigmoid       SigLIP pairwise sigmoid loss between towers.
  sigmoid_ring  SigLIP computed blockwise around a ring of devices
                (`shard_map` + `ppermute`), never holding the [B, B] logits.

The contrastive objectives read `outputs["embedding/<m>"]` [B, D] for every
modality and average the loss over all pairs of towers (one pair for two
towers; N-tower models as in Tian et al., "Contrastive Multiview Coding",
ECCV 2020). They run on global arrays inside `jax.jit`, so the negatives are
the whole global batch across devices.
"""

import functools
import itertools

import jax.numpy as jnp
import optax

from mmjax import losses


def supervised(logits: jnp.ndarray, batch: dict):
  """Softmax cross-entropy with integer labels, averaged over the batch.

  logits [B, K], batch["label"] [B] int -> (loss, {"loss", "accuracy"}).
  """
  labels = batch["label"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return loss, {"loss": loss, "accuracy": accuracy}


def _pairwise(pair_loss, outputs: dict, batch: dict):
  """Mean of `pair_loss(x, y, outputs)` over all pairs of embeddings."""
  del batch
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
  elif name == "sigmoid_ring":
    pair = lambda x, y, o: losses.sigmoid_contrastive_loss_ring(
        x, y, o["log_scale"], o["bias"], mesh)
  else:
    raise ValueError(f"unknown contrastive objective {name!r}")
  return functools.partial(_pairwise, pair)


OBJECTIVES = ("supervised", "softmax", "sigmoid", "sigmoid_ring")


def make_objective(name: str, mesh):
  """The objective function for config key `objective`."""
  return supervised if name == "supervised" else contrastive(name, mesh)
