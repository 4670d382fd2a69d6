"""Accuracy with each modality removed at test time."""

from collections.abc import Callable, Iterable, Iterator

import jax.numpy as jnp

from mmjax.evaluators.classification import classification


def remove_modality(batch: dict, modality: str) -> dict:
  """The batch with `modality` missing from every example: zeros, mask False."""
  return {**batch, modality: jnp.zeros_like(batch[modality]),
          f"mask/{modality}": jnp.zeros_like(batch[f"mask/{modality}"])}


def missing_modality(predict_fn: Callable[[dict], dict],
                     batches: Iterable[dict]) -> Iterator[tuple[str, float]]:
  """Yields ("without_<m>/accuracy", a) for each modality m of the batches.

  Each modality (a batch key with a `mask/<m>` companion) is removed from
  every example in turn, one full pass over `batches` per modality, so the
  model sees only the others: its masked fusion or learned mask tokens decide
  what a missing modality contributes.
  """
  modalities = None
  for batch in batches:
    modalities = sorted(k[len("mask/"):] for k in batch if k.startswith("mask/"))
    break
  for m in modalities or ():
    for name, value in classification(
        lambda batch, m=m: predict_fn(remove_modality(batch, m)), batches):
      if name == "accuracy":
        yield f"without_{m}/accuracy", value
