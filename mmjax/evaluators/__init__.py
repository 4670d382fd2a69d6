"""Evaluators: `evaluator(predict_fn, batches) -> iterator of (name, value)`.

An evaluator of a run is built once from its config options (`build`), then
called at every evaluation, on every eval split, with the same signature.
`predict_fn(batch)` returns a dict of arrays ("logits" [B, K] from a
classifier, "embedding/<modality>" [B, D] from contrastive towers);
`batches` is re-iterable (each `iter` is a new pass) and yields batch dicts
with a boolean "valid" [B] that marks padding. The trainer logs them
as `eval/<dataset>/<evaluator>/<metric>`, `<dataset>` being the dataset name
with the split appended unless it is "test" (`mmjax.results.metric_name`):
`eval/coco_mini/retrieval/text_to_image/R@1`, `eval/mnist_val/...`.

`batches.KeyedMap` makes seeded test-time variants of `batches` (modalities
removed at a rate, corruptions), the same for every model.

Options come from config (`config.evaluators` maps a name, an `EVALUATORS`
key or an import string `package.module:function`, to its keyword
arguments). `build` prepares two options once per run: `train_split` becomes
`train_batches` (that split's batches, e.g. for the linear probe), and
`prompts` ({"class_names", "templates"}) becomes `class_embeddings`, the
text tower's prompt-ensembled class embeddings: the prompts are tokenised
once, and embedded once per evaluation (the text tower may be training), not
once per split.

  classification    accuracy, loss (and majority vote for late fusion)
  missing_modality  accuracy with each modality removed
  retrieval         R@K in both directions, several items per example
  zero_shot         nearest class embedding: prompts or prototypes
  linear_probe      closed-form ridge classifier on frozen embeddings
  robustness        accuracy vs corruption level per modality, and MultiBench's
                    relative robustness (effective: `effective_robustness`)
"""

from collections.abc import Callable, Iterable, Iterator, Mapping

from mmjax import registry
from mmjax.evaluators.classification import classification
from mmjax.evaluators.linear_probe import linear_probe
from mmjax.evaluators.missing_modality import missing_modality
from mmjax.evaluators.retrieval import retrieval
from mmjax.evaluators.robustness import robustness
from mmjax.evaluators.zero_shot import class_embeddings_from_prompts, zero_shot

EVALUATORS = {"classification": classification,
              "missing_modality": missing_modality,
              "retrieval": retrieval,
              "zero_shot": zero_shot,
              "linear_probe": linear_probe,
              "robustness": robustness}



class Evaluator:
  """One evaluator of a run with its prepared options:
  `evaluator(predict_fn, batches)` yields (name, value).

  Attributes:
    function: the evaluator function.
    options: its keyword arguments, `train_split` already turned into
      `train_batches`.
    prompt_text: the token ids [K * T, L] of the `prompts` option, or None.
    prompts: (class_names, templates) of that option.
  """

  def __init__(self, function, options: dict, prompt_text=None,
               prompts=None):
    self.function, self.options = function, options
    self.prompt_text, self.prompts = prompt_text, prompts
    self._embedded_for, self._class_embeddings = None, None

  def class_embeddings(self, predict_fn):
    """The prompts' class embeddings [K, D] under `predict_fn`, computed
    once per `predict_fn` (one evaluation covers every split)."""
    if self._embedded_for is not predict_fn:
      embed = lambda _: predict_fn({"text": self.prompt_text})[
          "embedding/text"]
      self._class_embeddings = class_embeddings_from_prompts(
          embed, *self.prompts)
      self._embedded_for = predict_fn
    return self._class_embeddings

  def __call__(self, predict_fn: Callable[[dict], dict],
               batches: Iterable[dict]) -> Iterator[tuple[str, float]]:
    options = dict(self.options)
    if self.prompt_text is not None:
      options["class_embeddings"] = self.class_embeddings(predict_fn)
    return self.function(predict_fn, batches, **options)


def build(name: str, options: Mapping, *,
          split_batches: Callable[[str], Iterable[dict]] | None = None,
          tokenizer: Callable | None = None) -> Evaluator:
  """The evaluator `name` with `options` prepared (module docstring).

  split_batches: split name -> re-iterable eval batches (for `train_split`).
  tokenizer: list of strings -> (ids [N, L], mask) (for `prompts`).
  """
  function = registry.lookup("evaluators", name, EVALUATORS)
  options = dict(options)
  split = options.pop("train_split", None)
  if split:
    options["train_batches"] = split_batches(split)
  prompts = options.pop("prompts", None)
  if not prompts:
    return Evaluator(function, options)
  class_names, templates = prompts["class_names"], prompts["templates"]
  texts = [t.format(c) for c in class_names for t in templates]
  return Evaluator(function, options, tokenizer(texts)[0],
                   (class_names, templates))


__all__ = ["EVALUATORS", "Evaluator", "build", "classification", "linear_probe", "missing_modality",
           "retrieval", "robustness", "zero_shot"]
