"""Gradient-Blending: loss weights of the fused and unimodal heads, online.

Wang, Tran and Feiszli, "What Makes Training Multi-modal Classification
Networks Hard?", CVPR 2020 (arXiv 1905.12681); official code
facebookresearch/VMZ (`c2/lib/models/loss/loss_creator.py`
`add_weighted_loss`, `c2/lib/models/audio_visual_model.py` `g_blend`). The
loss is a weighted sum over the fused head and one auxiliary head per
modality (`model.unimodal_heads="aux"`), weights re-estimated online from
each head's overfitting and generalisation on held-out data (`GBlend`).

G-Blending, as followed here (heads k = fused, then each modality in sorted
order; L^V on held-out data, L^T on training data, measured at steps N and
N + n, n = `every`):

  overfitting    O_N = L^V_N - L^T_N
  changes        dO_k = O_{N+n} - O_N,  dG_k = L^V_N - L^V_{N+n}
  weights        w_k = (dG_k / dO_k^2) / Z,  Z = sum_k dG_k / dO_k^2, so that
                 sum_k w_k = 1 (the paper's w*_k = <grad L*, v_k> / sigma_k^2
                 / Z with <grad L*, v_k> ~ dG_k and sigma_k^2 ~ dO_k^2; its
                 overfitting-to-generalisation ratio is |dO / dG|)
  loss           sum_k w_k L_k (VMZ: audio_weight * L_a + visual_weight * L_v
                 + av_weight * L_av; its published example weights sum to 1)
  online         the weights start uniform (1 / (M + 1)) and are re-estimated
                 every `every` steps from the two latest measurements, the
                 first measurement taken before the first step.

  Guards (the estimate is noisy and the formula is undefined at dO = 0):
  a head whose held-out loss did not fall (dG_k <= 0) gets weight 0, since
  <grad L*, v_k> ~ dG_k <= 0 says its gradient does not help generalisation
  and a negative loss weight would climb its loss; dO_k is floored at
  `min_overfit` (dO_k <= 0 means the head did not overfit over the
  interval: it gets the largest weight its dG_k allows, not the infinite or
  overfitting-sized one the bare formula would give); if no head has
  dG_k > 0, or the losses are not finite, the previous weights stay.

  Deviations. (1) The paper's Gradient-Blend estimate trains each uni-modal
  model and the multi-modal model separately from the current checkpoint
  for a super-epoch and reads dG, dO off those runs; online here, the heads
  of the one jointly trained model are measured along its own trajectory
  (no extra training), so the weights describe each head inside the blended
  model. (2) The paper's V is a held-out part of the training set;
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
  losses; `after_step` measures every head's loss on a fixed held-out subset
  and a fixed training subset every `every` steps and re-estimates them.

  Options (`config.imbalance.gblend`): split (the held-out split, "val"),
  num_examples (of it, and as many training examples: 1000), every (50) and
  min_overfit (the floor of dO, 0.01).
  """

  OPTIONS = {"split": "val", "num_examples": 1000, "every": 50,
             "min_overfit": 0.01}

  def __init__(self, config, options, run=None):
    super().__init__(config, options, run)
    self.heads = ("fused", *head_modalities(config))
    self.every = self.options["every"]
    self.min_overfit = self.options["min_overfit"]
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
    for key in ("every", "num_examples", "min_overfit"):
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

  def losses(self, predict_fn, batches) -> np.ndarray:
    """Mean cross-entropy of every head over `batches`: [K] in `heads`
    order, each over the examples that have the head's modality."""
    results = dict(classification(predict_fn, batches))
    return np.array([results["loss"]] + [results[f"unimodal/{m}/loss"]
                                         for m in self.heads[1:]])

  def after_step(self, step, state, predict):
    """Every `every` steps (and at step 0): measures at `state.step` and
    re-estimates the weights from the previous measurement."""
    if step % self.every:
      return state, None
    predict_fn = lambda batch: predict(state, batch)
    held_out = self.losses(predict_fn, self.held_out)
    train = self.losses(predict_fn, self.train)
    old = jax.device_get(state.method_state)
    weights, row = old["weights"], {}
    if old["measured_at"] >= 0:
      new, delta_g, delta_o = blend_weights(
          old["held_out_loss"], old["train_loss"], held_out, train,
          self.min_overfit)
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
