"""Linear probe on frozen embeddings: closed-form ridge regression."""

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from mmjax.evaluators.retrieval import collect_valid


def _with_bias(x: np.ndarray) -> np.ndarray:
  """[N, D] -> [N, D + 1] float64 with a constant 1 column."""
  x = np.asarray(x, np.float64)
  return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def fit_ridge(features: np.ndarray, labels: np.ndarray, num_classes: int,
              l2: float) -> np.ndarray:
  """Ridge regression from features to one-hot targets, in float64.

  Solves (X^T X + l2 * n * R) W = X^T Y, where X [n, D + 1] is the features
  with a bias column of ones, Y [n, K] the one-hot labels and R the identity
  except for a 0 on the bias, which is left unpenalised (Hastie, Tibshirani &
  Friedman, "The Elements of Statistical Learning", 2009, Sec. 3.4.1) so that
  the fit does not depend on how the targets are coded (e.g. {0, 1} or
  {-1, 1}). Scaling the penalty by n keeps `l2` independent of the number of
  training examples. Needs l2 > 0 when n <= D.

  Args:
    features: [n, D].
    labels: [n] integers in [0, num_classes).
    num_classes: K.
    l2: ridge strength.

  Returns:
    [D + 1, K] weights; scores are `_with_bias(x) @ W`.
  """
  if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
    raise ValueError(f"labels outside [0, {num_classes})")
  x = _with_bias(features)
  y = np.eye(num_classes)[labels]
  n, d = x.shape
  penalty = np.eye(d) * l2 * n
  penalty[-1, -1] = 0.0
  return np.linalg.solve(x.T @ x + penalty, x.T @ y)


def linear_probe(predict_fn: Callable[[dict], dict], batches: Iterable[dict],
                 *, modality: str, train_batches: Iterable[dict],
                 label_key: str = "label", l2: float = 1e-3,
                 num_classes: int | None = None
                 ) -> Iterator[tuple[str, float]]:
  """Accuracy of a linear classifier fit on frozen `embedding/<modality>`.

  The classifier is closed-form ridge regression to one-hot targets
  (`fit_ridge`), the few-shot linear evaluation of Dosovitskiy, Beyer,
  Kolesnikov et al., "An Image is Worth 16x16 Words", ICLR 2021 (big_vision's
  `fewshot` evaluator, Beyer, Zhai & Kolesnikov): one exact solve instead of
  an SGD-trained logistic regression, so the probe is cheap, deterministic
  and has no learning rate or schedule to tune.
  It is fit on the valid examples of `train_batches` and scored on those of
  `batches`; the prediction is the class with the largest regression output.

  Args:
    predict_fn: batch -> {"embedding/<modality>": [B, D], ...}.
    batches: the evaluation split.
    modality: whose embeddings to probe.
    train_batches: the split to fit on (re-iterable batches with "valid").
    label_key: the batch key of the integer labels.
    l2: ridge strength, scaled by the number of training examples.
    num_classes: K; None = 1 + the largest training label.

  Yields:
    ("accuracy", a) on `batches`.
  """
  key = f"embedding/{modality}"
  train = collect_valid(predict_fn, train_batches, outputs=[key],
                        inputs=[label_key])
  train_labels = train[label_key].astype(np.int64)
  if num_classes is None:
    num_classes = int(train_labels.max(initial=-1)) + 1
  weights = fit_ridge(train[key], train_labels, num_classes, l2)
  test = collect_valid(predict_fn, batches, outputs=[key], inputs=[label_key])
  predictions = (_with_bias(test[key]) @ weights).argmax(-1)
  labels = test[label_key].astype(np.int64)
  yield "accuracy", float((predictions == labels).sum() / max(len(labels), 1))
