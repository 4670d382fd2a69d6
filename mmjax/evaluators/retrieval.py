"""Cross-modal retrieval recall (R@K) for contrastive models."""

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from mmjax.evaluators.classification import _host


def collect_valid(predict_fn: Callable[[dict], dict], batches: Iterable[dict],
                  outputs: Sequence[str] = (),
                  inputs: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """One pass over `batches`: the named arrays, on the host, valid rows only.

  Args:
    predict_fn: batch -> dict of (possibly sharded) arrays [B, ...].
    batches: re-iterable batches, each with a boolean "valid" [B].
    outputs: keys of `predict_fn`'s dict to collect.
    inputs: keys of the batch to collect; a key that no batch carries is left
      out of the result.

  Returns:
    {key: [N, ...]} over the N valid rows of the split, in order.
  """
  parts = {k: [] for k in (*outputs, *inputs)}
  for batch in batches:
    out = predict_fn(batch) if outputs else {}
    valid = _host(batch["valid"]).astype(bool)
    for k in outputs:
      parts[k].append(_host(out[k])[valid])
    for k in inputs:
      if k in batch:
        parts[k].append(_host(batch[k])[valid])
  if outputs and not parts[outputs[0]]:
    raise ValueError("the split has no batches")
  result = {k: np.concatenate(v) for k, v in parts.items() if v}
  if len({len(v) for v in result.values()}) > 1:
    raise ValueError(f"only some batches carry one of {list(inputs)}")
  return result


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
  """x / ||x|| along `axis` in float64; zero vectors stay zero."""
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def _items(embedding: np.ndarray, item_valid: np.ndarray | None):
  """Flattens [N, D] or [N, C, D] embeddings to valid items.

  Returns (items [I, D], owner [I]): each valid item and the index of the
  example it belongs to. `item_valid` ([N] or [N, C], None = all valid) marks
  the real items.
  """
  if embedding.ndim == 2:
    embedding = embedding[:, None]
  n, c, _ = embedding.shape
  valid = (np.ones((n, c), bool) if item_valid is None
           else np.asarray(item_valid, bool).reshape(n, c))
  owner = np.broadcast_to(np.arange(n)[:, None], (n, c))
  return l2_normalize(embedding[valid]), owner[valid]


def recall_at_k(queries: np.ndarray, query_owner: np.ndarray,
                targets: np.ndarray, target_owner: np.ndarray,
                ks: Sequence[int], chunk: int = 1024) -> dict[int, float]:
  """R@K: the fraction of queries with a matching target among the top K.

  A target matches a query when both belong to the same example (same
  owner), so a query with several matching targets (an image with 5
  captions) succeeds when ANY of them is in its top K. Ties are counted
  against the query: its rank is the number of non-matching targets scoring
  at least as high as its best matching one, so collapsed (constant)
  embeddings score 0, not 1. Queries whose example has no target item are
  skipped.

  Args:
    queries: [Q, D] L2-normalised query items.
    query_owner: [Q] example index of each query.
    targets: [T, D] L2-normalised target items.
    target_owner: [T] example index of each target.
    ks: the K values.
    chunk: queries per similarity block ([chunk, T] floats at a time).

  Returns:
    {k: recall in [0, 1]}.
  """
  keep = np.isin(query_owner, target_owner)
  queries, query_owner = queries[keep], query_owner[keep]
  ranks = []
  for start in range(0, len(queries), chunk):
    sim = queries[start:start + chunk] @ targets.T  # [q, T] cosines
    match = query_owner[start:start + chunk, None] == target_owner[None]
    best = np.where(match, sim, -np.inf).max(1, keepdims=True)
    ranks.append(((sim >= best) & ~match).sum(1))
  ranks = np.concatenate(ranks) if ranks else np.zeros(0, int)
  return {k: float((ranks < k).sum() / max(len(ranks), 1)) for k in ks}


def retrieval(predict_fn: Callable[[dict], dict], batches: Iterable[dict], *,
              query: str = "text", target: str = "image",
              ks: Sequence[int] = (1, 5, 10)) -> Iterator[tuple[str, float]]:
  """Cross-modal retrieval recall over a whole split, both directions.

  Collects `embedding/<query>` and `embedding/<target>` for every valid
  example ([B, D], or [B, C, D] with C items per example whose real ones the
  batch marks in "valid/<m>" [B, C]), ranks all items of one side by cosine
  similarity to each item of the other, and reports R@K as in the COCO /
  Flickr30k protocol of Karpathy & Fei-Fei, "Deep Visual-Semantic Alignments
  for Generating Image Descriptions", CVPR 2015: text-to-image counts, per
  valid caption, whether its own image is in the top K; image-to-text counts,
  per image, whether ANY of its captions is in the top K (see
  `recall_at_k`). Either side may carry several items per example.

  Yields:
    ("<query>_to_<target>/R@<k>", r) for each k, then
    ("<target>_to_<query>/R@<k>", r) for each k.
  """
  keys = [f"embedding/{query}", f"embedding/{target}"]
  data = collect_valid(predict_fn, batches, outputs=keys,
                       inputs=[f"valid/{query}", f"valid/{target}"])
  q = _items(data[keys[0]], data.get(f"valid/{query}"))
  t = _items(data[keys[1]], data.get(f"valid/{target}"))
  for (a, b), (src, dst) in (((q, t), (query, target)),
                             ((t, q), (target, query))):
    for k, r in recall_at_k(a[0], a[1], b[0], b[1], ks).items():
      yield f"{src}_to_{dst}/R@{k}", r
