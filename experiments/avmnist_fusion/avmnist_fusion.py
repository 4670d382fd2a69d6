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
# # Every fusion on AV-MNIST, three seeds
#
# The 14 fusions of `mmjax/models/fusion` on `avmnist` (MultiBench's AV-MNIST
# protocol, `configs/avmnist.py:grid`: LeNet encoders giving 9 tokens per
# modality, an MLP head), one epoch for all (430 steps of 128), seeds 0, 1 and 2. Test
# accuracy (mean and standard deviation over the seeds) with both modalities
# and with each removed at test time.
#
# Published figures on this protocol, MultiBench (Liang et al., "MultiBench:
# Multiscale Benchmarks for Multimodal Representation Learning", NeurIPS 2021
# Datasets and Benchmarks), as the project's AV-MNIST issue states them:
# image-only LeNet about 65%, audio-only about 43%, fused about 71-73% after
# full training. The per-method table could not be read offline, so the
# figure shows these as reference lines. Our budget is far shorter.
#
# Sweep: `bash experiments/avmnist_fusion/sweep.sh DIR`; reads
# `$MMJAX_RESULTS/results.json` (default: the results committed here) and
# writes `$MMJAX_FIGURES/avmnist_fusion.png`.

# %%
import os
import pathlib

import matplotlib.pyplot as plt
import numpy as np

from mmjax.results import load_results, metric

RESULTS = pathlib.Path(os.environ.get("MMJAX_RESULTS", "."))
FIGURES = pathlib.Path(os.environ.get("MMJAX_FIGURES", "."))
rows = [r for r in load_results(RESULTS) if r["status"] == "ok"]
print(f"{len(rows)} finished runs of {rows[0]['total_steps']} steps on "
      f"{rows[0]['machine']}")

# %%
COLUMNS = {"test": "classification/accuracy",
           "without audio": "missing_modality/without_audio/accuracy",
           "without image": "missing_modality/without_image/accuracy"}
table = {}
for fusion in sorted({r["fusion"] for r in rows}):
  runs = [r for r in rows if r["fusion"] == fusion]
  table[fusion] = {
      name: 100 * np.array([metric(r, key) for r in runs])
      for name, key in COLUMNS.items()}
  table[fusion]["runs"] = runs
order = sorted(table, key=lambda f: table[f]["test"].mean())


def mean_std(values):
  return (f"{values.mean():.2f} ± {values.std(ddof=1):.2f}" if len(values) > 1
          else f"{values.mean():.2f}")


print("| fusion | test accuracy (%) | seeds | without audio (%) | "
      "without image (%) | parameters | train MFLOP/example | wall time (s) |")
print("|---|---|---|---|---|---|---|---|")
for fusion in order:
  t, runs = table[fusion], table[fusion]["runs"]
  print(f"| {fusion} | {mean_std(t['test'])} | {len(runs)} | "
        f"{mean_std(t['without audio'])} | {mean_std(t['without image'])} | "
        f"{runs[0]['num_params']:,} | "
        f"{runs[0]['train_flops_per_example'] / 1e6:.1f} | "
        f"{np.mean([r['wall_time_s'] for r in runs]):.0f} |")

# %%
fig, ax = plt.subplots(figsize=(9, 3.8))
x = np.arange(len(order))
means = [table[f]["test"].mean() for f in order]
stds = [table[f]["test"].std(ddof=1) if len(table[f]["test"]) > 1 else 0
        for f in order]
ax.bar(x, means, yerr=stds, capsize=3, color="C0", label="mmjax (this sweep)")
ax.axhspan(71, 73, color="C2", alpha=0.25, label="MultiBench fused, 71-73%")
ax.axhline(65, color="C1", linestyle="--", label="MultiBench image-only, 65%")
ax.axhline(43, color="C3", linestyle=":", label="MultiBench audio-only, 43%")
ax.set_xticks(x, order, rotation=45, ha="right")
ax.set_ylabel("test accuracy (%)")
ax.set_title(f"AV-MNIST, {rows[0]['total_steps']} steps of 128, "
             f"mean ± std over seeds")
ax.set_ylim(0, 100)
ax.grid(axis="y", alpha=0.3)
ax.legend(loc="upper left", fontsize=8)
fig.tight_layout()
fig.savefig(FIGURES / "avmnist_fusion.png", dpi=120)
