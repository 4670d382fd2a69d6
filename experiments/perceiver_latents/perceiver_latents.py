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
# # How many latents does the Perceiver resampler need?
#
# Flamingo's Perceiver resampler (Alayrac et al., "Flamingo: a Visual
# Language Model for Few-Shot Learning", NeurIPS 2022) compresses the 9 + 9
# LeNet tokens of AV-MNIST into a fixed number of learned latents, which the
# head reads. Test accuracy and training throughput against the number of
# latents, at one short budget (`configs/avmnist.py:grid,fusion=perceiver`).
#
# Sweep: `bash experiments/perceiver_latents/sweep.sh DIR`; reads
# `$MMJAX_RESULTS/results.json` (default: the results committed here).

# %%
import os
import pathlib

import matplotlib.pyplot as plt

from mmjax.results import cell, load_results, metric

RESULTS = pathlib.Path(os.environ.get("MMJAX_RESULTS", "."))
FIGURES = pathlib.Path(os.environ.get("MMJAX_FIGURES", "."))
rows = sorted((r for r in load_results(RESULTS) if r["status"] == "ok"),
              key=lambda r: r["latents"])
print(f"{len(rows)} finished runs of {rows[0]['total_steps']} steps on "
      f"{rows[0]['machine']}")

# %%
print("| latents | test accuracy (%) | parameters | train MFLOP/example | "
      "train examples/s | step time (ms) |")
print("|---|---|---|---|---|---|")
for r in rows:
  eps = r["examples_per_sec"]
  r["step_ms"] = 1e3 * r["batch_size"] / eps if eps else None
  print(f"| {r['latents']} | {100 * metric(r, 'classification/accuracy'):.2f} "
        f"| {r['num_params']:,} | {r['train_flops_per_example'] / 1e6:.1f} | "
        f"{cell(eps)} | {cell(r['step_ms'])} |")

latents = [r["latents"] for r in rows]
fig, (ax, speed) = plt.subplots(1, 2, figsize=(9, 3.4))
ax.plot(latents, [100 * metric(r, "classification/accuracy") for r in rows],
        marker="o")
ax.set_xscale("log", base=2)
ax.set_xticks(latents, [str(n) for n in latents])
ax.set_xlabel("resampler latents")
ax.set_ylabel("test accuracy (%)")
ax.grid(alpha=0.3)
timed = [r for r in rows if r["step_ms"] is not None]
speed.plot([r["latents"] for r in timed], [r["step_ms"] for r in timed],
           marker="o", color="C1")
speed.set_xscale("log", base=2)
speed.set_xticks(latents, [str(n) for n in latents])
speed.set_xlabel("resampler latents")
speed.set_ylabel("train step time (ms)")
speed.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(FIGURES / "perceiver_latents.png", dpi=120)
