"""Evaluators: `evaluator(predict_fn, batches) -> iterator of (name, value)`.

`predict_fn(batch)` returns a dict of arrays (at least "logits" [B, K]);
`batches` yields batch dicts with a boolean "valid" [B] that marks padding.
"""

from mmjax.evaluators.classification import classification

EVALUATORS = {"classification": classification}

__all__ = ["EVALUATORS", "classification"]
