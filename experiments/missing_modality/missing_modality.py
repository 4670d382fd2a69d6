# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Missing and corrupted modalities at test time
#
# Five fusions (late, concat, perceiver, bottleneck, coattention), each
# trained on `avmnist/clean` with and without modality dropout (each modality
# removed from a training example with probability 0.3, never both), then
# evaluated with (1) each modality removed from a random fraction of the test
# examples and (2) each modality corrupted at increasing strength: Gaussian
# noise and occlusion on the image, white noise at falling SNR on the audio.
# Corruption robustness is reported as in MultiBench (Liang et al. 2021):
# relative robustness (area under the accuracy curve, levels on [0, 1]) and
# effective robustness (accuracy kept beyond late fusion's curve shifted to
# the same clean accuracy; MultiBench's baseline is late fusion).
#
# Sweep: `bash experiments/missing_modality/sweep.sh DIR`; this notebook
# reads `$MMJAX_RESULTS/results.json` (default: the results committed here)
# and writes its figures to `$MMJAX_FIGURES` (default: here).

# %%
import os
import pathlib

import matplotlib.pyplot as plt

from mmjax.results import (curve_from_results, effective_robustness,
                           load_results, metric, relative_robustness)

RESULTS = pathlib.Path(os.environ.get("MMJAX_RESULTS", "."))
FIGURES = pathlib.Path(os.environ.get("MMJAX_FIGURES", "."))
rows = [r for r in load_results(RESULTS) if r["status"] == "ok"]
print(f"{len(rows)} finished runs of {rows[0]['total_steps']} steps on "
      f"{rows[0]['machine']}")
runs = {(r["fusion"], float(r["drop"])): r for r in rows}
fusions = sorted({f for f, _ in runs})
drops = sorted({d for _, d in runs})


def missing_curve(row, modality):
  """(rates, accuracies) with `modality` removed from a fraction of examples."""
  head = f"missing_modality/{modality}_missing/"
  points = sorted((float(k.split(head)[1].split("/")[0]), v)
                  for k, v in row.items() if head in k)
  return [p[0] for p in points], [p[1] for p in points]


# %% [markdown]
# ## Accuracy against the test-time missing rate

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
for ax, modality in zip(axes, ("image", "audio")):
  for i, fusion in enumerate(fusions):
    for drop in drops:
      if (fusion, drop) not in runs:
        continue
      rates, acc = missing_curve(runs[fusion, drop], modality)
      ax.plot(rates, [100 * a for a in acc], color=f"C{i}",
              linestyle="-" if drop else "--", marker="o", markersize=3,
              label=f"{fusion}, dropout {drop:g}")
  ax.set_xlabel(f"fraction of test examples without the {modality}")
  ax.set_title(f"{modality} missing")
  ax.grid(alpha=0.3)
axes[0].set_ylabel("accuracy (%)")
axes[1].legend(fontsize=7, ncol=2)
fig.tight_layout()
fig.savefig(FIGURES / "missing_rate.png", dpi=120)

print("| fusion | modality dropout | accuracy (%) | without image (%) | "
      "without audio (%) |")
print("|---|---|---|---|---|")
for (fusion, drop), row in sorted(runs.items()):
  print(f"| {fusion} | {drop:g} | "
        f"{100 * metric(row, 'classification/accuracy'):.2f} | "
        f"{100 * metric(row, 'missing_modality/without_image/accuracy'):.2f} | "
        f"{100 * metric(row, 'missing_modality/without_audio/accuracy'):.2f} |")

# %% [markdown]
# ## Corruption: accuracy curves, relative and effective robustness

# %%
CURVES = [("image", "gaussian_noise"), ("image", "occlusion"),
          ("audio", "awgn")]


def curve(row, modality, corruption):
  """(levels, accuracies) of the `robustness` evaluator's curve in `row`."""
  robustness = {k.split("/robustness/", 1)[1]: v for k, v in row.items()
                if "/robustness/" in k}
  return curve_from_results(robustness, modality, corruption)


fig, axes = plt.subplots(1, len(CURVES), figsize=(12, 3.6), sharey=True)
for ax, (modality, corruption) in zip(axes, CURVES):
  for i, fusion in enumerate(fusions):
    for drop in drops:
      if (fusion, drop) in runs:
        levels, acc = curve(runs[fusion, drop], modality, corruption)
        ax.plot(levels, [100 * a for a in acc], color=f"C{i}",
                linestyle="-" if drop else "--", marker="o", markersize=3,
                label=f"{fusion}, dropout {drop:g}")
  ax.set_xlabel("level" + (" (noise RMS / signal RMS)" if modality == "audio"
                           else ""))
  ax.set_title(f"{modality}: {corruption}")
  ax.grid(alpha=0.3)
axes[0].set_ylabel("accuracy (%)")
axes[-1].legend(fontsize=7, ncol=2)
fig.tight_layout()
fig.savefig(FIGURES / "corruption.png", dpi=120)

print("| fusion | modality dropout | " + " | ".join(
    f"{m} {c}: relative / effective" for m, c in CURVES) + " |")
print("|---|---|" + "---|" * len(CURVES))
for (fusion, drop), row in sorted(runs.items()):
  cells = []
  for modality, corruption in CURVES:
    levels, acc = curve(row, modality, corruption)
    baseline = runs.get(("late", drop))
    effective = (effective_robustness(acc, curve(baseline, modality,
                                                 corruption)[1])
                 if baseline else float("nan"))
    cells.append(f"{relative_robustness(acc, levels):.3f} / {effective:+.3f}")
  print(f"| {fusion} | {drop:g} | " + " | ".join(cells) + " |")
