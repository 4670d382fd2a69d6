"""Objectives: model outputs and batch -> scalar loss and metrics."""

import jax.numpy as jnp
import optax


def supervised(logits: jnp.ndarray, batch: dict):
  """Softmax cross-entropy with integer labels, averaged over the batch.

  logits [B, K], batch["label"] [B] int -> (loss, {"loss", "accuracy"}).
  """
  labels = batch["label"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return loss, {"loss": loss, "accuracy": accuracy}


OBJECTIVES = {"supervised": supervised}
