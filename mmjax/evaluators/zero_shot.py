"""Zero-shot classification by the nearest class embedding (cosine)."""

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from mmjax.evaluators.retrieval import collect_valid, l2_normalize


def class_embeddings_from_prompts(
    embed_fn: Callable[[list[str]], np.ndarray], class_names: Sequence[str],
    templates: Sequence[str]) -> np.ndarray:
  """CLIP's prompt ensembling: one embedding per class from T prompts.

  Every template (a format string with one "{}", e.g. "a photo of a {}.") is
  filled with every class name; `embed_fn` embeds the K * T prompts in one
  call (class-major order: all templates of class 0, then class 1, ...); each
  prompt embedding is L2-normalised, averaged over the templates of its
  class and the mean L2-normalised again, as in Radford et al., "Learning
  Transferable Visual Models From Natural Language Supervision", ICML 2021.

  Args:
    embed_fn: list of N strings -> [N, D] embeddings.
    class_names: the K class names.
    templates: the T prompt templates.

  Returns:
    [K, D] float32 unit-norm class embeddings.
  """
  prompts = [t.format(name) for name in class_names for t in templates]
  emb = l2_normalize(np.asarray(embed_fn(prompts), np.float64))
  emb = emb.reshape(len(class_names), len(templates), -1).mean(1)
  return l2_normalize(emb).astype(np.float32)


def class_prototypes(embeddings: np.ndarray, labels: np.ndarray,
                     num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-class mean embedding, L2-normalised.

  Args:
    embeddings: [N, D].
    labels: [N] integer classes in [0, num_classes).
    num_classes: K.

  Returns:
    (prototypes [K, D], present [K] bool: False for classes without examples,
    whose prototype is zero).
  """
  sums = np.zeros((num_classes, embeddings.shape[-1]))
  np.add.at(sums, labels, l2_normalize(embeddings))
  present = np.bincount(labels, minlength=num_classes) > 0
  return l2_normalize(sums), present


def zero_shot(predict_fn: Callable[[dict], dict], batches: Iterable[dict], *,
              modality: str, class_embeddings=None,
              prototypes_from: str | None = None,
              label_key: str = "label") -> Iterator[tuple[str, float]]:
  """Accuracy of classifying `embedding/<modality>` by the nearest class.

  Each valid example's embedding [B, D] gets the class whose embedding has
  the highest cosine similarity. The K class embeddings are either given
  (`class_embeddings` [K, D], e.g. from `class_embeddings_from_prompts`) or
  built from the same split (`prototypes_from="image"`: the normalised mean
  `embedding/image` of each class, so every example of `modality` goes to its
  nearest class prototype, as in prototypical networks, Snell et al.,
  "Prototypical Networks for Few-shot Learning", NeurIPS 2017; classes with
  no example in the split are never predicted). One pass over `batches`
  collects both embeddings and the labels on the host.

  Yields:
    ("accuracy", a) over the valid examples.

  Raises:
    ValueError: unless exactly one of `class_embeddings`, `prototypes_from`
      is given.
  """
  if (class_embeddings is None) == (prototypes_from is None):
    raise ValueError("zero_shot needs exactly one of class_embeddings and "
                     "prototypes_from")
  outputs = [f"embedding/{modality}"]
  if prototypes_from is not None and prototypes_from != modality:
    outputs.append(f"embedding/{prototypes_from}")
  data = collect_valid(predict_fn, batches, outputs=outputs,
                       inputs=[label_key])
  labels = data[label_key].astype(np.int64)
  if not len(labels):
    yield "accuracy", 0.0
    return
  if class_embeddings is not None:
    classes = l2_normalize(np.asarray(class_embeddings))
    present = np.ones(len(classes), bool)
  else:
    classes, present = class_prototypes(
        data[f"embedding/{prototypes_from}"], labels,
        int(labels.max(initial=-1)) + 1)
  scores = l2_normalize(data[outputs[0]]) @ classes.T  # [N, K] cosines
  predictions = np.where(present, scores, -np.inf).argmax(-1)
  yield "accuracy", float((predictions == labels).sum() / max(len(labels), 1))
