"""OGM-GE: On-the-fly Gradient Modulation with Generalization Enhancement.

Peng, Wei, Deng, Wang and Hu, "Balanced Multimodal Learning via On-the-fly
Gradient Modulation", CVPR 2022 (arXiv 2203.15332); official code
GeWu-Lab/OGM-GE_CVPR2022 `main.py`, `train_epoch`. Every step scales the
gradients of the dominant modality's encoder down and adds Gaussian noise to
the encoders' gradients (`OgmGe.transform_grads`).

OGM-GE, as followed here (M modalities u, batch B_t at step t, K classes):

  score        s^u = sum_{i in B_t, u present} softmax(z_i^u)[y_i], z^u the
               unimodal logits [B, K]; n^u the number of those examples.
  discrepancy  rho^u = (s^u / n^u) / mean_{v != u} (s^v / n^v).
  coefficient  k^u = 1 - tanh(alpha * relu(rho^u)) if rho^u > 1, else 1
               (the paper's Eq. 10, with the official code's relu).
  OGM          g^u <- k^u g^u for every gradient tensor g^u of modality u's
               encoder (`encoder_<u>` and its front end `frontend_<u>`).
  GE           g^u <- k^u g^u + eps, eps ~ N(0, (std(g^u) + 1e-8)^2) drawn
               per tensor, std the unbiased standard deviation of the
               unmodulated g^u over its entries (the official code:
               `parms.grad * coeff + zeros_like(parms.grad).normal_(0,
               parms.grad.std().item() + 1e-8)`), added for every modality,
               the one with k^u = 1 included.
  window       modulation and noise only at steps start_step <= t <= end_step
               (0-based; end_step < 0: to the end), the official
               `modulation_starts <= epoch <= modulation_ends` in steps.

  For two modalities with every modality present, rho^a = s^a / s^v and
  rho^v = 1 / rho^a as in the official code, and exactly one modality (the
  dominant one) has rho > 1, unless the scores tie exactly: then the official
  code modulates audio (its else branch) and we modulate neither (Eq. 10's
  strict inequality). For M > 2 every modality scoring above the mean of the
  others is modulated. A batch where some modality is missing from every
  example gives k = 1 throughout (no score to compare).

  Deviations. (1) Scores: the paper decomposes the linear classifier of
  concatenation, z^u = W^u f^u + b / 2. With fusion "concat", a linear head
  (`head_hidden=()`) and no unimodal heads, that is exactly what is done
  (`decomposed_logits`, b / M for M modalities, from what the model sows:
  "fused" [B, sum_u D_u] and "features/<u>" [B, D_u]); with unimodal heads
  (`model.unimodal_heads` "probe" or "aux") the scores come from those linear
  heads on each modality's pooled encoder tokens, so OGM-GE works with any
  fusion that has per-modality encoders. (2) Which tensors: the paper
  modulates the encoder parameters theta^u; the official code only the 4-D
  (convolution kernel) gradients of its ResNet-18 encoders, which
  `conv_only=True` reproduces. (3) Steps instead of epochs for the window.
  The method was designed with SGD (the official code: SGD, momentum 0.9,
  weight decay 1e-4, applied after the modulation as here); Adam's
  normalisation largely undoes a constant scale k.
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import UsageError
from mmjax.methods import Method
from mmjax.models.fusion import FUSIONS, Unimodal

def modality_scores(outputs: dict, labels: jnp.ndarray,
                    modalities) -> tuple[jnp.ndarray, jnp.ndarray]:
  """OGM-GE's scores: (s [M], n [M]) in `modalities` order.

  s^u sums softmax(unimodal_logits/<u>)[label] [B] over the examples where u
  is present ("unimodal_present/<u>" [B]); n^u counts them. labels: [B] int.
  """
  scores, counts = [], []
  for m in modalities:
    probs = jax.nn.softmax(
        outputs[f"unimodal_logits/{m}"].astype(jnp.float32), -1)
    p_label = jnp.take_along_axis(probs, labels[:, None], -1)[:, 0]
    present = outputs[f"unimodal_present/{m}"].astype(jnp.float32)
    scores.append(jnp.sum(p_label * present))
    counts.append(jnp.sum(present))
  return jnp.stack(scores), jnp.stack(counts)


def ogm_coefficients(scores: jnp.ndarray, counts: jnp.ndarray,
                     alpha: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(rho [M], k [M]) from scores s [M] and counts n [M], M >= 2.

  rho^u = (s^u / n^u) / mean_{v != u}(s^v / n^v); k^u = 1 - tanh(alpha *
  relu(rho^u)) where rho^u > 1, else 1; k = 1 everywhere if some n^u = 0.
  """
  mean = scores / jnp.maximum(counts, 1.0)
  others = (jnp.sum(mean) - mean) / (mean.shape[0] - 1)
  rho = mean / jnp.maximum(others, jnp.finfo(jnp.float32).tiny)
  k = jnp.where(rho > 1, 1.0 - jnp.tanh(alpha * jax.nn.relu(rho)), 1.0)
  return rho, jnp.where(jnp.all(counts > 0), k, 1.0)


def gradient_noise_std(grad: jnp.ndarray) -> jnp.ndarray:
  """GE's noise scale for one gradient tensor: its standard deviation over
  all entries, unbiased (N - 1, as torch's `Tensor.std()`; N for a single
  entry), plus 1e-8."""
  return jnp.std(grad, ddof=1 if grad.size > 1 else 0) + 1e-8


def encoder_keys(params: dict, modality: str) -> list[str]:
  """The top-level parameter subtrees of `modality`'s encoder: its front end
  (if it has parameters) and `encoder_<m>`."""
  return [k for k in (f"frontend_{modality}", f"encoder_{modality}")
          if k in params]


def modulate_encoder_grads(grads: dict, coefficients: dict, rng,
                           noise_scale=1.0, conv_only: bool = False) -> dict:
  """OGM (and GE): each modality's encoder gradients times its coefficient,
  plus per-tensor Gaussian noise.

  grads: the parameter gradient tree. coefficients: {modality: k} scalars.
  A tensor g of modality u becomes k^u g + noise_scale * std(g) * N(0, 1)
  (`gradient_noise_std` of the unmodulated g); noise_scale 0 is OGM alone,
  1 OGM-GE. conv_only: only 4-D tensors (convolution kernels), as the
  official code; the rest stay as they are.
  """
  grads = dict(grads)
  add_noise = not (isinstance(noise_scale, (int, float)) and noise_scale == 0)
  index = 0
  for m in sorted(coefficients):
    for key in encoder_keys(grads, m):
      leaves, treedef = jax.tree.flatten(grads[key])
      chosen = [not conv_only or g.ndim == 4 for g in leaves]
      if add_noise:  # one draw per subtree, cut into the tensors' shapes
        sizes = [g.size for g, c in zip(leaves, chosen) if c]
        flat = jax.random.normal(jax.random.fold_in(rng, index),
                                 (sum(sizes),), jnp.float32)
        pieces = iter(jnp.split(flat, np.cumsum(sizes)[:-1]))
      index += 1
      new = []
      for g, c in zip(leaves, chosen):
        if c:
          out = coefficients[m] * g
          if add_noise:
            noise = next(pieces).reshape(g.shape).astype(g.dtype)
            out = out + noise_scale * gradient_noise_std(g) * noise
          g = out
        new.append(g)
      grads[key] = jax.tree.unflatten(treedef, new)
  return grads


def ogm_ge(grads: dict, outputs: dict, labels: jnp.ndarray, step, rng,
           modalities, *, alpha: float, start_step: int, end_step: int,
           noise: bool, conv_only: bool) -> tuple[dict, dict]:
  """One step of OGM-GE: (modulated grads, metrics "ogm/{rho,k,score}/<m>").

  k is logged as applied: 1 outside the window. "score" is s^u / n^u, the
  mean probability of the label.
  """
  scores, counts = modality_scores(outputs, labels, modalities)
  rho, k = ogm_coefficients(scores, counts, alpha)
  active = (step >= start_step) & ((end_step < 0) | (step <= end_step))
  k = jnp.where(active, k, 1.0)
  noise_scale = jnp.where(active, 1.0, 0.0) if noise else 0.0
  grads = modulate_encoder_grads(grads, dict(zip(modalities, k)), rng,
                                 noise_scale, conv_only)
  metrics = {}
  for i, m in enumerate(modalities):
    metrics[f"ogm/rho/{m}"] = rho[i]
    metrics[f"ogm/k/{m}"] = k[i]
    metrics[f"ogm/score/{m}"] = scores[i] / jnp.maximum(counts[i], 1.0)
  return grads, metrics


def decomposed_logits(intermediates: dict, head_params: dict,
                      modalities) -> dict:
  """The linear concat head split by modality: {u: f_u W_u + b / M} [B, K].

  intermediates: what `MultimodalClassifier` sowed, with "fused" [B, sum_u
  D_u] (the masked pooled features f_u in sorted modality order, as
  `ConcatFusion` concatenates them) and "features/<u>" [B, D_u] (for the
  widths D_u). head_params: the linear head's {"kernel" [sum_u D_u, K],
  "bias" [K]}. The M parts sum to the fused logits.
  """
  fused = intermediates["fused"][0]
  out, start = {}, 0
  for u in sorted(modalities):
    width = intermediates[f"features/{u}"][0].shape[-1]
    out[u] = (fused[:, start:start + width] @
              head_params["kernel"][start:start + width] +
              head_params["bias"] / len(modalities))
    start += width
  return out


def head_modalities(config) -> tuple[str, ...]:
  """The modalities the model scores, sorted: all of `config.modalities`, or
  the one a unimodal fusion uses."""
  fusion = FUSIONS.get(config.model.fusion)
  if isinstance(fusion, functools.partial) and fusion.func is Unimodal:
    return (fusion.keywords["modality"],)
  return tuple(sorted(config.modalities))


class OgmGe(Method):
  """OGM-GE's gradient modulation as a training method (module docstring).

  Options (`config.imbalance.ogm_ge`): alpha (0.1, the official README's
  default; 0.8 for CREMA-D), start_step and end_step (the window, 0-based;
  end_step < 0: to the end), noise (GE on; False: OGM alone) and conv_only
  (only the 4-D convolution kernels, as the official code).
  """

  OPTIONS = {"alpha": 0.1, "start_step": 0, "end_step": -1, "noise": True,
             "conv_only": False}

  # Optimizers that divide by a running gradient scale (Adam's family).
  ADAPTIVE = ("adamw", "adam")

  def __init__(self, config, options, run=None):
    super().__init__(config, options, run)
    self.modalities = head_modalities(config)
    if run is not None and config.optimizer.name in self.ADAPTIVE:
      print(f"warning: imbalance.method ogm_ge with optimizer.name "
            f"'{config.optimizer.name}': the paper trains with SGD (momentum "
            "0.9); an adaptive optimizer normalises away much of the "
            "modulation", file=sys.stderr)
    # Scores from the unimodal heads, else from the decomposed linear head.
    self.decomposed = config.model.get("unimodal_heads", "none") == "none"

  @classmethod
  def check(cls, config, options):
    heads = config.model.get("unimodal_heads", "none")
    if len(head_modalities(config)) < 2:
      raise UsageError(f"config key 'imbalance.method': ogm_ge needs two or "
                       f"more modalities; fusion '{config.model.fusion}' "
                       "uses one")
    if heads == "none" and (config.model.fusion != "concat" or
                            tuple(config.model.head_hidden)):
      raise UsageError("config key 'imbalance.method': ogm_ge scores each "
                       "modality with unimodal heads (model.unimodal_heads "
                       "probe or aux) or, for model.fusion 'concat' with "
                       "model.head_hidden (), with its decomposed linear head")
    if options["alpha"] < 0:
      raise UsageError(f"config key 'imbalance.ogm_ge.alpha' must be >= 0, "
                       f"got {options['alpha']}")

  def transform_grads(self, grads, *, outputs, intermediates, batch, state,
                      rng):
    if self.decomposed:
      logits = decomposed_logits(intermediates,
                                 state.params["head"]["dense_0"],
                                 self.modalities)
      outputs = {}
      for u in self.modalities:
        outputs[f"unimodal_logits/{u}"] = logits[u]
        outputs[f"unimodal_present/{u}"] = intermediates[f"present/{u}"][0]
    return ogm_ge(grads, outputs, batch["label"], state.step,
                  jax.random.fold_in(rng, 1), self.modalities, **self.options)
