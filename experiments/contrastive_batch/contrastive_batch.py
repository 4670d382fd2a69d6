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
# # Softmax against sigmoid contrastive loss across batch sizes
#
# Audio-image contrastive training on spoken x handwritten digits
# (`configs/av_contrastive.py`: LeNet towers, no labels) with the CLIP/ALIGN
# softmax loss and the SigLIP sigmoid loss (Zhai et al., "Sigmoid Loss for
# Language Image Pre-Training", ICCV 2023), at batch sizes 32 to 256. Every
# run sees the same number of training pairs, so a larger batch means fewer,
# larger steps with more in-batch negatives. Metric: zero-shot digit
# accuracy on test, each spoken digit assigned to the nearest class
# prototype of image embeddings.
#
# Sweep: `bash experiments/contrastive_batch/sweep.sh DIR`; reads
# `$MMJAX_RESULTS/results.json` (default: the results committed here).

# %%
import os
import pathlib

import matplotlib.pyplot as plt

from mmjax.results import cell, load_results, metric

RESULTS = pathlib.Path(os.environ.get("MMJAX_RESULTS", "."))
FIGURES = pathlib.Path(os.environ.get("MMJAX_FIGURES", "."))
rows = [r for r in load_results(RESULTS) if r["status"] == "ok"]
print(f"{len(rows)} finished runs on {rows[0]['machine']}")


# %%
print("| objective | batch | steps | zero-shot accuracy (%) | "
      "train examples/s | wall time (s) |")
print("|---|---|---|---|---|---|")
fig, ax = plt.subplots(figsize=(5, 3.4))
for i, objective in enumerate(sorted({r["objective"] for r in rows})):
  runs = sorted((r for r in rows if r["objective"] == objective),
                key=lambda r: r["batch"])
  accuracy = [100 * metric(r, "zero_shot/accuracy") for r in runs]
  ax.plot([r["batch"] for r in runs], accuracy, marker="o", color=f"C{i}",
          label=objective)
  for r, a in zip(runs, accuracy):
    print(f"| {objective} | {r['batch']} | {r['total_steps']} | {a:.2f} | "
          f"{cell(r['examples_per_sec'])} | {r['wall_time_s']:.0f} |")
ax.set_xscale("log", base=2)
ax.set_xlabel("batch size (same number of training pairs)")
ax.set_ylabel("zero-shot digit accuracy (%)")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(FIGURES / "contrastive_batch.png", dpi=120)
