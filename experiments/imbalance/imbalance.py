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
# # Modality imbalance: plain training, OGM-GE and G-Blending
#
# On `avmnist` the image is the strong modality (about 65% alone) and the
# noisy audio the weak one (about 43%), so a jointly trained model can lean
# on the image and leave the audio encoder under-trained. Two remedies, both
# training methods (`mmjax/methods/`):
#
# - OGM-GE (Peng et al., "Balanced Multimodal Learning via On-the-fly
#   Gradient Modulation", CVPR 2022) scales down the gradients of the
#   dominant modality's encoder by 1 - tanh(alpha * rho), rho its score
#   ratio over the other, and adds Gaussian noise (generalisation
#   enhancement);
# - G-Blending (Wang, Tran and Feiszli, "What Makes Training Multi-modal
#   Classification Networks Hard?", CVPR 2020) trains unimodal auxiliary
#   heads next to the fused one and weights the losses by each head's
#   generalisation over its overfitting, re-estimated every super-epoch (50
#   steps) as the paper's online algorithm does: each head trained alone for
#   10 steps from a copy of the model, measured on held-out data.
#
# All three runs use OGM-GE's optimizer, SGD with momentum 0.9 (learning
# rate 0.01, weight decay 1e-4), so that the methods differ only in
# themselves.
#
# Unimodal accuracy: the linear probe heads (behind stop_gradient, so they
# measure without changing the encoders) for plain training and OGM-GE; for
# G-Blending, its auxiliary unimodal heads, which are trained into the
# encoders by the method itself.
#
# Sweep: `bash experiments/imbalance/sweep.sh DIR`; reads
# `$MMJAX_RESULTS/results.json` (default: the results committed here).

# %%
import os
import pathlib

import matplotlib.pyplot as plt
import numpy as np

from mmjax.results import cell, load_results, metric

RESULTS = pathlib.Path(os.environ.get("MMJAX_RESULTS", "."))
FIGURES = pathlib.Path(os.environ.get("MMJAX_FIGURES", "."))
ORDER = ["none", "ogm_ge", "gblend"]
rows = sorted((r for r in load_results(RESULTS) if r["status"] == "ok"),
              key=lambda r: ORDER.index(r["imbalance"]))
print(f"{len(rows)} finished runs of {rows[0]['total_steps']} steps on "
      f"{rows[0]['machine']}")

# %%
COLUMNS = {"fused": "classification/accuracy",
           "image head": "classification/unimodal/image/accuracy",
           "audio head": "classification/unimodal/audio/accuracy"}
print("| method | " + " | ".join(f"{c} (%)" for c in COLUMNS) +
      " | train examples/s |")
print("|---|" + "---|" * (len(COLUMNS) + 1))
for r in rows:
  cells = " | ".join(f"{100 * metric(r, key):.2f}" for key in COLUMNS.values())
  print(f"| {r['imbalance']} | {cells} | {cell(r['examples_per_sec'])} |")

fig, ax = plt.subplots(figsize=(6, 3.4))
width = 0.8 / len(COLUMNS)
for j, (name, key) in enumerate(COLUMNS.items()):
  xs = np.arange(len(rows)) + (j - (len(COLUMNS) - 1) / 2) * width
  ax.bar(xs, [100 * metric(r, key) for r in rows], width, label=name)
ax.set_xticks(range(len(rows)), [r["imbalance"] for r in rows])
ax.set_ylabel("test accuracy (%)")
ax.set_title(f"avmnist, concat, {rows[0]['total_steps']} steps")
ax.grid(axis="y", alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIGURES / "imbalance.png", dpi=120)
