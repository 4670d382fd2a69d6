"""Accuracy under test-time corruption, and MultiBench's robustness metrics.

Liang et al., "MultiBench: Multiscale Benchmarks for Multimodal
Representation Learning", NeurIPS 2021 Datasets and Benchmarks, measure each
model's accuracy as one modality is corrupted at increasing levels (their
`robustness/*_robust.py`, noise levels 0, 0.1, 0.2, ...: 9 to 11 of them
depending on the task) and summarise the accuracy-vs-level curve with two
numbers, defined in their `eval_scripts/robustness.py`
(github.com/pliang279/MultiBench):

  relative robustness   `relative_robustness_helper`: the area under one
                        model's curve by the trapezoid rule with step 0.1,
                        sum_i (a_i + a_{i+1}) * 0.1 / 2
  effective robustness  `effective_robustness_helper`: the model's curve f
                        against late fusion's curve lf after equalising clean
                        accuracy, beta = lf + (f_0 - lf_0),
                        sum_i (f_i - beta_i)

Their leaderboard then min-max normalises each number over the methods of
its task (`maxmin_normalize`, here `minmax_normalize`). The evaluator
`robustness` yields the curves and each curve's relative robustness; the
effective robustness needs a second model's curve, so notebooks call
`effective_robustness(curve, baseline_curve)` on the results of two runs
(`curve_from_results` reads a curve back from logged metrics).

Levels. MultiBench's fixed step 0.1 assumes levels evenly spaced 0.1 apart
from 0; on 11 levels that is [0, 1]. Here a curve's levels are mapped
affinely onto [0, 1], x_i = (l_i - l_0) / (l_last - l_0), and the area is the
trapezoid rule over the x_i: on the grid 0, 0.1, ..., 1 this is exactly their
number, and any grid gives an area on [0, 1] (a mean accuracy over the
severity range). Their fixed step on n < 11 levels integrates over
[0, (n - 1) / 10] instead: their number is ours times (n - 1) / 10 on such a
grid. Effective robustness is a sum over levels, not an area, exactly as
theirs: it grows with the number of levels, so compare only curves taken on
the same levels.
"""

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from mmjax.data import corruptions as corruptions_lib
from mmjax.results import (  # noqa: F401  (this evaluator's summaries)
    level_positions,
    curve_from_results, effective_robustness, minmax_normalize,
    relative_robustness)
from mmjax.evaluators.batches import KeyedMap
from mmjax.evaluators.classification import classification

# MultiBench's severity grid: 0, 0.1, ..., 1.
UNIT_LEVELS = tuple(round(i / 10, 1) for i in range(11))
# Noise RMS / signal RMS 0..10: SNR inf, 0, -6.0, -9.5, -12.0, -14.0, -15.6,
# -16.9, -18.1, -19.1, -20 dB. An audio-only LeNet still reaches 68% on
# spectrograms of -10 dB audio and 39.5% at -15 dB (the `avmnist` builder's
# calibration), so the informative range lies below 0 dB. On int16 audio the
# lowest levels saturate loud clips (see `corruptions.awgn`).
AWGN_LEVELS = tuple(float(i) for i in range(11))
IMAGE_CORRUPTIONS = {"gaussian_noise": UNIT_LEVELS, "occlusion": UNIT_LEVELS}


def default_corruptions(batch: dict) -> dict[str, dict[str, tuple]]:
  """Default curves for the modalities of `batch` (keys with a `mask/<m>`).

  image: gaussian_noise (std 0..1 of the pixel range) and occlusion (area
  0..1), 11 levels each. audio: awgn at AWGN_LEVELS for a waveform [B, T];
  a spectrogram [B, F, T(, 1)] (default `avmnist`) gets the image
  corruptions. text: token_dropout p = 0..1. Other modalities have none.
  """
  defaults = {}
  for key in sorted(batch):
    if not key.startswith("mask/"):
      continue
    m = key[len("mask/"):]
    if m not in batch:
      continue
    ndim = np.ndim(batch[m])
    if m == "image":
      defaults[m] = dict(IMAGE_CORRUPTIONS)
    elif m == "audio":
      defaults[m] = ({"awgn": AWGN_LEVELS} if ndim == 2
                     else dict(IMAGE_CORRUPTIONS))
    elif m == "text":
      defaults[m] = {"token_dropout": UNIT_LEVELS}
  return defaults


def _accuracy(predict_fn: Callable[[dict], dict], batches: Iterable[dict]
              ) -> float:
  """The `classification` evaluator's accuracy."""
  return float(dict(classification(predict_fn, batches))["accuracy"])


def _check(corruptions: Mapping, batch: dict):
  """Fails before any evaluation on unknown names or unusable level lists."""
  for m, curves in corruptions.items():
    if m not in batch:
      raise ValueError(f"robustness: modality {m!r} is not in the batches "
                       f"(keys {sorted(batch)})")
    for name, levels in curves.items():
      if name not in corruptions_lib.CORRUPTIONS:
        raise ValueError(f"robustness: unknown corruption {name!r} for {m}; "
                         f"known: {', '.join(corruptions_lib.CORRUPTIONS)}")
      levels = [float(level) for level in levels]
      if len(levels) < 2 or levels[0] != 0:
        raise ValueError(f"robustness: levels of {m}/{name} must start at 0 "
                         f"(clean) and have at least 2 entries, got {levels}")
      level_positions(levels, len(levels))


def robustness(predict_fn: Callable[[dict], dict], batches: Iterable[dict],
               corruptions: Mapping[str, Mapping[str, Sequence[float]]]
               | None = None, seed: int = 0) -> Iterator[tuple[str, float]]:
  """Accuracy under each corruption of each modality, and its robustness.

  Yields ("<modality>/<corruption>/<level>/accuracy", a) for every level
  (formatted with "%g") and ("<modality>/<corruption>/relative_robustness", r)
  per curve (`relative_robustness` over the levels; MultiBench, Liang et
  al. NeurIPS 2021). Effective robustness compares two runs:
  `effective_robustness` on their curves.

  Args:
    predict_fn: batch -> {"logits": [B, K], ...}.
    batches: re-iterable eval batches; one pass per corrupted level.
    corruptions: {modality: {corruption: levels}}, corruption names from
      `mmjax.data.corruptions.CORRUPTIONS`, levels increasing from 0 (clean).
      None: `default_corruptions` for the modalities of the batches.
    seed: batch i is corrupted with fold_in(PRNGKey(seed), i).

  Level 0 is the identity, so the clean accuracy (the `classification`
  evaluator's) is measured once and shared by every curve: a run costs one
  pass plus one per non-zero level (41 for the AV-MNIST defaults).
  """
  first = next(iter(batches), None)
  if first is None:
    return
  if corruptions is None:
    corruptions = default_corruptions(first)
  _check(corruptions, first)
  clean = _accuracy(predict_fn, batches) if corruptions else None
  for m in sorted(corruptions):
    for name in sorted(corruptions[m]):
      levels = [float(level) for level in corruptions[m][name]]
      curve = []
      for level in levels:
        def corrupt(batch, key, m=m, name=name, level=level):
          return {**batch,
                  m: corruptions_lib.corrupt(batch[m], name, key, level)}
        accuracy = clean if level == 0 else _accuracy(
            predict_fn, KeyedMap(batches, corrupt, seed))
        curve.append(accuracy)
        yield f"{m}/{name}/{level:g}/accuracy", accuracy
      yield (f"{m}/{name}/relative_robustness",
             relative_robustness(curve, levels))
