"""Seeded test-time transforms of evaluation batches."""

from collections.abc import Callable, Iterable, Iterator

import jax


class KeyedMap:
  """Re-iterable `batches` with batch i replaced by `fn(batch, key_i)`,
  key_i = fold_in(PRNGKey(seed), i): every pass, and every model evaluated
  with the same seed, sees the same transformed batches."""

  def __init__(self, batches: Iterable[dict],
               fn: Callable[[dict, jax.Array], dict], seed: int):
    self._batches, self._fn, self._seed = batches, fn, seed

  def __iter__(self) -> Iterator[dict]:
    key = jax.random.PRNGKey(self._seed)
    for i, batch in enumerate(self._batches):
      yield self._fn(batch, jax.random.fold_in(key, i))
