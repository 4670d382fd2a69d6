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
# # Where to fuse: MBT's fusion layer from early to late
#
# Attention bottleneck fusion (Nagrani et al., "Attention Bottlenecks for
# Multimodal Fusion", NeurIPS 2021) on `avmnist/clean` with 4 transformer
# layers over the 9 + 9 LeNet tokens: layers before `fusion_layer` attend
# within each modality only, layers from `fusion_layer` on exchange
# information through 4 shared bottleneck tokens. `fusion_layer=0` fuses from
# the first layer (early), `fusion_layer=4` never exchanges and only averages
# the modalities' [CLS] outputs (late). Accuracy and cost per depth.
#
# Sweep: `bash experiments/fusion_depth/sweep.sh DIR`; reads
# `$MMJAX_RESULTS/results.json` (default: the results committed here).

# %%
import os
import pathlib

import matplotlib.pyplot as plt

from mmjax.results import cell, load_results, metric

RESULTS = pathlib.Path(os.environ.get("MMJAX_RESULTS", "."))
FIGURES = pathlib.Path(os.environ.get("MMJAX_FIGURES", "."))
rows = sorted((r for r in load_results(RESULTS) if r["status"] == "ok"),
              key=lambda r: r["fusion_layer"])
print(f"{len(rows)} finished runs of {rows[0]['total_steps']} steps on "
      f"{rows[0]['machine']}")

# %%
print("| fusion_layer | test accuracy (%) | without audio (%) | "
      "without image (%) | parameters | train MFLOP/example | "
      "train examples/s |")
print("|---|---|---|---|---|---|---|")
for r in rows:
  print(f"| {r['fusion_layer']} | "
        f"{100 * metric(r, 'classification/accuracy'):.2f} | "
        f"{100 * metric(r, 'missing_modality/without_audio/accuracy'):.2f} | "
        f"{100 * metric(r, 'missing_modality/without_image/accuracy'):.2f} | "
        f"{r['num_params']:,} | {r['train_flops_per_example'] / 1e6:.1f} | "
        f"{cell(r['examples_per_sec'])} |")

layers = [r["fusion_layer"] for r in rows]
fig, (ax, cost) = plt.subplots(1, 2, figsize=(9, 3.4))
for label, key in (("both", "classification/accuracy"),
                   ("without audio", "missing_modality/without_audio/accuracy"),
                   ("without image", "missing_modality/without_image/accuracy")):
  ax.plot(layers, [100 * metric(r, key) for r in rows], marker="o", label=label)
ax.legend(fontsize=8)
ax.set_xticks(layers)
ax.set_xlabel("fusion_layer (0 = early, 4 = late)")
ax.set_ylabel("test accuracy (%)")
ax.grid(alpha=0.3)
cost.plot(layers, [r["train_flops_per_example"] / 1e6 for r in rows],
          marker="o", color="C1")
cost.set_xticks(layers)
cost.set_xlabel("fusion_layer")
cost.set_ylabel("train MFLOP per example")
cost.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(FIGURES / "fusion_depth.png", dpi=120)
