"""Gradient-Blending: loss weights of the fused and unimodal heads, online.

Wang, Tran and Feiszli, "What Makes Training Multi-modal Classification
Networks Hard?", CVPR 2020 (arXiv 1905.12681); official code
facebookresearch/VMZ (`c2/lib/models/loss/loss_creator.py`
`add_weighted_loss`, `c2/lib/models/audio_visual_model.py` `g_blend`). The
loss is a weighted sum over the fused head and one auxiliary head per
modality (`model.unimodal_heads="aux"`), weights re-estimated online from
each head's overfitting and generalisation on held-out data (`GBlend`).

G-Blending, as followed here (heads k = fused, then each modality in sorted
order; L^V on held-out data, L^T on training data; N and N + n the start and
end of an estimate, see `GBlend` for the two estimators):

  overfitting    O_N = L^V_N - L^T_N
  changes        dO_k = O_{N+n} - O_N,  dG_k = L^V_N - L^V_{N+n}
  weights        w_k = (dG_k / dO_k^2) / Z,  Z = sum_k dG_k / dO_k^2, so that
                 sum_k w_k = 1 (the paper's w*_k = <grad L*, v_k> / sigma_k^2
                 / Z with <grad L*, v_k> ~ dG_k and sigma_k^2 ~ dO_k^2; its
                 overfitting-to-generalisation ratio is |dO / dG|)
  loss           sum_k w_k L_k (VMZ: audio_weight * L_a + visual_weight * L_v
                 + av_weight * L_av; its published example weights sum to 1)
  online         the paper's Algorithm 1: every super-epoch (`every` steps,
                 the first before the first step) the weights for the next
                 one are estimated by training each uni-modal model and the
                 multi-modal model separately, from a copy of the current
                 checkpoint, for `estimate_steps` steps (estimator
                 "separate"); until then they are uniform (1 / (M + 1)).

  Guards (the estimate is noisy and the formula is undefined at dO = 0):
  a head whose held-out loss did not fall (dG_k <= 0) gets weight 0, since
  <grad L*, v_k> ~ dG_k <= 0 says its gradient does not help generalisation
  and a negative loss weight would climb its loss; dO_k is floored at
  `min_overfit` (dO_k <= 0 means the head did not overfit over the
  interval: it gets the largest weight its dG_k allows, not the infinite or
  overfitting-sized one the bare formula would give); if no head has
  dG_k > 0, or the losses are not finite, the previous weights stay.

  Deviations. (1) The separate runs are `estimate_steps` steps, not a
  super-epoch, and each "uni-modal model" is the shared network trained on
  its modality's auxiliary head alone (which reaches only that modality's
  encoder and head); the cheaper estimator "trajectory" measures the heads
  of the jointly trained model along its own trajectory instead (`GBlend`).
  (2) The paper's V is a held-out part of the training set;
  `split` names the held-out split (default "val"; it only sets the
  weights) and `num_examples` a fixed random subset of it; L^T is measured
  in eval mode on a fixed random subset of the training split of the same
  size, not averaged over the training epoch. (3) Steps instead of epochs.
"""

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import UsageError
from mmjax.evaluators.classification import classification
from mmjax.methods import Method
from mmjax.methods.ogm_ge import head_modalities


def blend_weights(held_out_before, train_before, held_out_after, train_after,
                  min_overfit: float):
  """G-Blending's weights from two measurements of every head's losses.

  Each argument is [K] (losses of the K heads). Returns (weights [K] summing
  to 1, or None to keep the previous ones; dG [K]; dO [K]) with dG = L^V
  before - L^V after, dO = O after - O before, O = L^V - L^T, and weights
  proportional to dG / max(dO, min_overfit)^2 where dG > 0, else 0 (see the
  module docstring for why).
  """
  held_out_before, train_before, held_out_after, train_after = (
      np.asarray(x, np.float64) for x in (held_out_before, train_before,
                                          held_out_after, train_after))
  delta_g = held_out_before - held_out_after
  delta_o = (held_out_after - train_after) - (held_out_before - train_before)
  raw = np.where(delta_g > 0,
                 delta_g / np.maximum(delta_o, min_overfit) ** 2, 0.0)
  total = raw.sum()
  if not np.isfinite(total) or total <= 0:
    return None, delta_g, delta_o
  return raw / total, delta_g, delta_o


def gblend_init_state(num_heads: int) -> dict:
  """G-Blending's part of `TrainState.method_state`: uniform weights [K], the
  last measurement's losses [K] and its step (-1: none yet)."""
  return {"weights": jnp.full((num_heads,), 1.0 / num_heads, jnp.float32),
          "held_out_loss": jnp.zeros((num_heads,), jnp.float32),
          "train_loss": jnp.zeros((num_heads,), jnp.float32),
          "measured_at": jnp.full((), -1, jnp.int32)}


class Subset:
  """The examples `indices` of a random-access source, as a source."""

  def __init__(self, source, indices):
    self._source, self._indices = source, np.asarray(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i):
    return self._source[int(self._indices[i])]


class GBlend(Method):
  """Online G-Blending as a training method (module docstring).

  The loss weights live in `TrainState.method_state` ("weights" [K], K = 1 +
  the number of modalities, fused first), with the last measurement's
  losses. Every `every` steps (a super-epoch, and at step 0) `after_step`
  re-estimates them for the next super-epoch:

    estimator "separate" (the paper's Algorithm 1, the default): for each
      head k, a copy of the current train state (parameters and optimizer
      state) trains `estimate_steps` steps on the loss of head k alone (the
      uni-modal model of modality k, or the multi-modal model), on the same
      training batches for every head; the held-out and training losses of
      head k before and after give dG_k and dO_k. The copies are discarded.
    estimator "trajectory" (cheaper, no extra training): the heads of the
      jointly trained model are measured along its own trajectory, from the
      previous measurement to this one. Since each head's weight shapes how
      much it trains, a head weighted near 0 barely changes and keeps a small
      weight: the estimate feeds back on itself.

  Options (`config.imbalance.gblend`): split (the held-out split, "val"),
  num_examples (of it, and as many training examples: 1000), every (50),
  min_overfit (the floor of dO, 0.01), estimator ("separate") and
  estimate_steps (10).
  """

  OPTIONS = {"split": "val", "num_examples": 1000, "every": 50,
             "min_overfit": 0.01, "estimator": "separate",
             "estimate_steps": 10}
  ESTIMATORS = ("separate", "trajectory")

  def __init__(self, config, options, run=None):
    super().__init__(config, options, run)
    self.heads = ("fused", *head_modalities(config))
    self.every = self.options["every"]
    self.min_overfit = self.options["min_overfit"]
    self.seed = config.seed
    self.total_steps = config.total_steps
    self.run = run
    if run is not None:  # measuring needs the data; the weights alone don't
      self.held_out = self._fixed_subset(
          run, run.data_source(self.options["split"]), config.seed)
      self.train = self._fixed_subset(run, run.train_source, config.seed)

  def _fixed_subset(self, run, source, seed: int):
    n = min(self.options["num_examples"], len(source))
    order = np.random.default_rng(seed).permutation(len(source))
    return run.eval_batches(Subset(source, np.sort(order[:n])))

  @classmethod
  def check(cls, config, options):
    if len(head_modalities(config)) < 2:
      raise UsageError(f"config key 'imbalance.method': gblend needs two or "
                       f"more modalities; fusion '{config.model.fusion}' "
                       "uses one")
    heads = config.model.get("unimodal_heads", "none")
    if heads != "aux":
      raise UsageError(f"config key 'imbalance.method': gblend needs "
                       f"model.unimodal_heads 'aux', got '{heads}'")
    if options["estimator"] not in cls.ESTIMATORS:
      raise UsageError(f"unknown imbalance.gblend.estimator "
                       f"'{options['estimator']}' (known: "
                       f"{', '.join(cls.ESTIMATORS)})")
    for key in ("every", "num_examples", "min_overfit", "estimate_steps"):
      if options[key] <= 0:
        raise UsageError(f"config key 'imbalance.gblend.{key}' must be "
                         f"positive, got {options[key]}")

  def init_state(self) -> dict:
    return gblend_init_state(len(self.heads))

  def loss_weights(self, method_state):
    weights = method_state["weights"]
    return {head: weights[i] for i, head in enumerate(self.heads)}

  def transform_grads(self, grads, *, outputs, intermediates, batch, state,
                      rng):
    weights = state.method_state["weights"]
    return grads, {f"gblend/weight/{head}": weights[i]
                   for i, head in enumerate(self.heads)}

  def losses(self, predict, state, batches) -> np.ndarray:
    """Mean cross-entropy of every head over `batches`: [K] in `heads`
    order, each over the examples that have the head's modality."""
    results = dict(classification(lambda b: predict(state, b), batches))
    return np.array([results["loss"]] + [results[f"unimodal/{m}/loss"]
                                         for m in self.heads[1:]])

  def _trained_alone(self, state, head: int, step: int, train_step):
    """A copy of `state` trained `estimate_steps` steps on head `head`'s
    loss alone (the weights one-hot), on batches seeded by `step`."""
    copy = jax.tree.map(jnp.copy, state)
    weights = state.method_state["weights"]
    one_hot = jax.device_put(np.eye(len(self.heads), dtype=np.float32)[head],
                             weights.sharding)
    copy = copy.replace(method_state={**copy.method_state,
                                      "weights": one_hot})
    data = self.run.train_iterator(seed=self.seed + 1 + step)
    for _ in range(self.options["estimate_steps"]):
      copy, _ = train_step(copy, next(data))
    return copy

  def after_step(self, step, state, predict, train_step):
    """Every `every` steps (and at step 0): new weights for the next
    super-epoch (class docstring); none after the last step."""
    if step % self.every or step >= self.total_steps:
      return state, None
    held_out = self.losses(predict, state, self.held_out)
    train = self.losses(predict, state, self.train)
    old = jax.device_get(state.method_state)
    weights, row, estimate = old["weights"], {}, None
    if self.options["estimator"] == "separate":
      held_after, train_after = np.empty_like(held_out), np.empty_like(train)
      for k in range(len(self.heads)):
        alone = self._trained_alone(state, k, step, train_step)
        held_after[k] = self.losses(predict, alone, self.held_out)[k]
        train_after[k] = self.losses(predict, alone, self.train)[k]
      estimate = (held_out, train, held_after, train_after)
    elif old["measured_at"] >= 0:  # "trajectory": since the last measurement
      estimate = (old["held_out_loss"], old["train_loss"], held_out, train)
    if estimate is not None:
      new, delta_g, delta_o = blend_weights(*estimate, self.min_overfit)
      weights = weights if new is None else new
      for i, head in enumerate(self.heads):
        row[f"gblend/delta_g/{head}"] = float(delta_g[i])
        row[f"gblend/delta_o/{head}"] = float(delta_o[i])
    for i, head in enumerate(self.heads):
      row[f"gblend/held_out_loss/{head}"] = float(held_out[i])
      row[f"gblend/train_loss/{head}"] = float(train[i])
      row[f"gblend/weight/{head}"] = float(weights[i])
    new_state = {"weights": weights, "held_out_loss": held_out,
                 "train_loss": train, "measured_at": int(state.step)}
    new_state = jax.tree.map(
        lambda x, like: jax.device_put(np.asarray(x, like.dtype),
                                       like.sharding),
        new_state, state.method_state)
    return state.replace(method_state=new_state), row
