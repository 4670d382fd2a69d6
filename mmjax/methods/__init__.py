"""Training-time methods: hooks that the trainer calls, one class each.

A method changes how a model trains without a branch in the trainer: the
train step asks it for loss weights and lets it transform the gradients, and
the loop lets it update its state after a step. `Method` is the protocol, and
its hooks are no-ops, so a method overrides only what it changes:

  init_state()                  -> the method's part of the train state, a
                                   dict of arrays (`TrainState.method_state`,
                                   saved in every checkpoint).
  loss_weights(method_state)    -> the objective's per-head weights, or None.
  transform_grads(grads, *, outputs, intermediates, batch, state, rng)
                                -> (grads, metrics); inside the jitted step.
                                   outputs: the model's outputs; intermediates:
                                   what the model sowed (e.g. "fused",
                                   "features/<m>"); state: the TrainState
                                   before the update.
  after_step(step, state, predict, train_step)
                                -> (state, metrics row or None); on the host
                                   after each step, and with step 0 before the
                                   first step of a fresh run. predict: jitted
                                   (state, batch) -> outputs; train_step: the
                                   compiled (state, batch) -> (state, metrics),
                                   which donates its state.

The config names one method in `config.imbalance.method`: "none" (also when
the config has no `imbalance`), "ogm_ge", "gblend" or an import string
`package.module:Class`. Its options live in `config.imbalance.<method>` (a
method defined outside mmjax reads `config.imbalance.options`, if the config
has it). A method class takes `(config, options, run)`: `run` gives what a
method may need of the run (`config`, `mesh`, `train_source`,
`data_source(split)`, `eval_batches(source)`, `train_iterator(seed)`);
`OPTIONS` holds its option defaults and `check(config, options)` its
one-line config errors.

  none    plain training (`Method`).
  ogm_ge  OGM-GE, Peng et al., CVPR 2022 (`ogm_ge.OgmGe`).
  gblend  online Gradient-Blending, Wang et al., CVPR 2020
          (`gblend.GBlend`).
"""

from mmjax import registry
from mmjax.errors import UsageError


class Method:
  """Plain training: every hook leaves training as it is."""

  OPTIONS: dict = {}

  def __init__(self, config=None, options=None, run=None):
    del config, run
    self.options = dict(options or {})

  @classmethod
  def check(cls, config, options: dict):
    """Raises UsageError (one line) for a config this method cannot use."""

  def init_state(self) -> dict:
    return {}

  def loss_weights(self, method_state: dict) -> dict | None:
    del method_state
    return None

  def transform_grads(self, grads, *, outputs, intermediates, batch, state,
                      rng) -> tuple[dict, dict]:
    del outputs, intermediates, batch, state, rng
    return grads, {}

  def after_step(self, step: int, state, predict, train_step
                 ) -> tuple[object, dict | None]:
    del step, predict, train_step
    return state, None


def _registry() -> dict:
  # Imported here: the methods import evaluators and data, which import jax.
  from mmjax.methods.gblend import GBlend  # pylint: disable=import-outside-toplevel
  from mmjax.methods.ogm_ge import OgmGe  # pylint: disable=import-outside-toplevel
  return {"none": Method, "ogm_ge": OgmGe, "gblend": GBlend}



def method_and_options(config) -> tuple[type, dict]:
  """(the method class `config.imbalance.method` names, its options over the
  class's defaults); UsageError for an unknown method or option."""
  section = config.get("imbalance") or {}
  name = section.get("method", "none")
  cls = registry.lookup("imbalance.method", name, _registry())
  key = "options" if registry.is_import_string(name) else name
  given = section.get(key) or {}
  given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
  unknown = sorted(set(given) - set(cls.OPTIONS))
  if unknown:
    raise UsageError(f"unknown config key 'imbalance.{key}.{unknown[0]}' "
                     f"(known: {', '.join(sorted(cls.OPTIONS))})")
  return cls, {**cls.OPTIONS, **given}


def check_config(config):
  """One-line UsageErrors for the method keys of `config`."""
  cls, options = method_and_options(config)
  if cls is not Method and config.objective != "supervised":
    raise UsageError("config key 'imbalance.method' needs objective "
                     "'supervised'")
  cls.check(config, options)


def build(config, run) -> Method:
  """The method of `config`, ready for the trainer's hooks."""
  cls, options = method_and_options(config)
  return cls(config, options, run)


__all__ = ["Method", "build", "check_config", "method_and_options"]
