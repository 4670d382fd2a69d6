"""Accuracy with each modality removed at test time, fully or at a rate."""

from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp

from mmjax.evaluators.batches import KeyedMap
from mmjax.evaluators.classification import classification
from mmjax.evaluators.vqa import vqa

# The evaluators whose metrics `missing_modality` reports with a modality
# removed: classification's accuracy, or every VQA accuracy (overall and per
# question family, generated answers or an answer-classifier head).
SCORED = {"classification": lambda p, b, **_: (
              (k, v) for k, v in classification(p, b) if k == "accuracy"),
          "vqa": vqa}


def remove_modality(batch: dict, modality: str, removed=None) -> dict:
  """The batch with `modality` missing (zeros, mask False) from the examples
  where `removed` [B] is True; from every example when `removed` is None."""
  x, mask = batch[modality], batch[f"mask/{modality}"]
  if removed is None:
    return {**batch, modality: jnp.zeros_like(x),
            f"mask/{modality}": jnp.zeros_like(mask)}
  keep = ~removed.reshape(removed.shape + (1,) * (x.ndim - 1))
  return {**batch, modality: jnp.where(keep, x, jnp.zeros_like(x)),
          f"mask/{modality}": mask & ~removed}


def _modalities(batches: Iterable[dict]) -> list[str]:
  for batch in batches:
    return sorted(k[len("mask/"):] for k in batch if k.startswith("mask/"))
  return []


def missing_modality(predict_fn: Callable[[dict], dict],
                     batches: Iterable[dict], rates: Sequence[float] = (),
                     seed: int = 0, scored_by: str = "classification",
                     tokenizer=None, **options) -> Iterator[tuple[str, float]]:
  """Yields ("without_<m>/accuracy", a) for each modality m of the batches,
  and ("<m>_missing/<rate>/accuracy", a) for each of `rates`.

  Each modality (a batch key with a `mask/<m>` companion) is removed from
  every example in turn, one full pass over `batches` per modality, so the
  model sees only the others: its masked fusion or learned mask tokens decide
  what a missing modality contributes. With `rates`, modality m is instead
  removed from each example independently with probability `rate` (batch i
  draws with `fold_in(fold_in(PRNGKey(seed), i), j)` for the j-th modality,
  the same examples for every model),
  the others left intact: accuracy against the test-time missing rate.

  `scored_by` "vqa" scores question answering instead (`mmjax.evaluators.vqa`
  with `tokenizer` and `options`: families, answers), giving
  "without_<m>/accuracy" and "without_<m>/accuracy/<family>".
  """
  if scored_by not in SCORED:
    raise ValueError(f"missing_modality scored_by must be one of "
                     f"{', '.join(SCORED)}, got {scored_by!r}")
  if tokenizer is not None:
    options["tokenizer"] = tokenizer
  score = lambda p, b: SCORED[scored_by](p, b, **options)
  modalities = _modalities(batches)
  for m in modalities:
    for name, value in score(
        lambda batch, m=m: predict_fn(remove_modality(batch, m)), batches):
      yield f"without_{m}/{name}", value
  for j, m in enumerate(modalities):
    for rate in rates:
      if not 0 <= rate <= 1:
        raise ValueError(f"missing_modality rates must be in [0, 1], got {rate}")
      def remove_some(batch, key, m=m, j=j, rate=rate):
        removed = jax.random.bernoulli(jax.random.fold_in(key, j), rate,
                                       batch[f"mask/{m}"].shape)
        return remove_modality(batch, m, removed)
      for name, value in score(predict_fn,
                               KeyedMap(batches, remove_some, seed)):
        yield f"{m}_missing/{rate:g}/{name}", value
