"""Evaluators: `evaluator(predict_fn, batches) -> iterator of (name, value)`.

`predict_fn(batch)` returns a dict of arrays ("logits" [B, K] from a
classifier, "embedding/<modality>" [B, D] from contrastive towers);
`batches` is re-iterable (each `iter` is a new pass) and yields batch dicts
with a boolean "valid" [B] that marks padding. The trainer logs them
as `eval/<dataset>/<evaluator>/<metric>`, `<dataset>` being the dataset name
with the split appended unless it is "test" (`train.eval_name`):
`eval/coco_mini/retrieval/text_to_image/R@1`, `eval/mnist_val/...`.

`batches.KeyedMap` makes seeded test-time variants of `batches` (modalities
removed at a rate, corruptions), the same for every model.

Options come from config (`config.evaluators` maps a name to its keyword
arguments); the trainer turns `train_split` into `train_batches`.

  classification    accuracy, loss (and majority vote for late fusion)
  missing_modality  accuracy with each modality removed
  retrieval         R@K in both directions, several items per example
  zero_shot         nearest class embedding: prompts or prototypes
  linear_probe      closed-form ridge classifier on frozen embeddings
  robustness        accuracy vs corruption level per modality, and MultiBench's
                    relative robustness (effective: `effective_robustness`)
"""

from mmjax.evaluators.classification import classification
from mmjax.evaluators.linear_probe import linear_probe
from mmjax.evaluators.missing_modality import missing_modality
from mmjax.evaluators.retrieval import retrieval
from mmjax.evaluators.robustness import robustness
from mmjax.evaluators.zero_shot import zero_shot

EVALUATORS = {"classification": classification,
              "missing_modality": missing_modality,
              "retrieval": retrieval,
              "zero_shot": zero_shot,
              "linear_probe": linear_probe,
              "robustness": robustness}

__all__ = ["EVALUATORS", "classification", "linear_probe", "missing_modality",
           "retrieval", "robustness", "zero_shot"]
