"""Evaluators: `evaluator(predict_fn, batches) -> iterator of (name, value)`.

`predict_fn(batch)` returns a dict of arrays (at least "logits" [B, K]);
`batches` is re-iterable (each `iter` is a new pass) and yields batch dicts
with a boolean "valid" [B] that marks padding. The trainer logs the
`classification` metrics as `eval/<split>/<metric>` and every other
evaluator's as `eval/<split>/<evaluator>/<metric>`.
"""

from mmjax.evaluators.classification import classification
from mmjax.evaluators.missing_modality import missing_modality

EVALUATORS = {"classification": classification,
              "missing_modality": missing_modality}

__all__ = ["EVALUATORS", "classification", "missing_modality"]
