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
# # Question answering over an image grid and a spoken digit
#
# `digits_qa` asks questions that need the image (the digit at a position,
# counting, sums, comparisons), the audio (the spoken digit) or both (is the
# spoken digit in the grid, where, the spoken digit plus a cell). The
# generative models of `configs/digits_qa.py` decode the answer as text
# (`prefix`: PaLI-style media prefix; `cross_attention`; `flamingo`: gated
# cross-attention into the frozen text-only `lm`), the baselines classify it
# over the closed answer vocabulary from the same tokens (`classifier`), the
# image and question only (`image_question`) or the question alone
# (`question_only`). Exact-match accuracy per question family on the test
# split and on `test_compositional` (family x digit combinations held out of
# training), and test accuracy with the audio or the image removed.
#
# Sweep: `bash experiments/digits_qa/sweep.sh DIR`; reads the results.json
# of `$MMJAX_RESULTS` and of its `flamingo`, `cells` and `cells/registers`
# (default: the results committed here): the 1500-step runs over the image
# LeNet's grid of tokens, then the 6000-step runs of the large build over
# the cell tokens of a locked MNIST LeNet.

# %%
import os
import pathlib

import matplotlib.pyplot as plt
import numpy as np

from mmjax.results import cell, load_results

RESULTS = pathlib.Path(os.environ.get("MMJAX_RESULTS", "."))
FIGURES = pathlib.Path(os.environ.get("MMJAX_FIGURES", "."))
FAMILIES = ("digit_at", "count", "sum", "compare", "spoken", "spoken_in_grid",
            "where_spoken", "spoken_plus")
TWO_MODALITIES = ("spoken_in_grid", "where_spoken", "spoken_plus")
ORDER = ("question_only", "image_question", "classifier", "lm", "prefix",
         "cross_attention", "flamingo")


def finished(*dirs):
  """The finished rows of the sweeps in `dirs`, in ORDER of their model."""
  rows = [r for d in dirs if (d / "results.json").exists()
          for r in load_results(d) if r["status"] == "ok"]
  return sorted(rows, key=lambda r: (ORDER.index(r["model"]),
                                     r.get("registers", 0)))


def label(row):
  registers = row.get("registers", 0)
  return row["model"] + (f", {registers} register" if registers else "")


sweeps = {"grid tokens": finished(RESULTS, RESULTS / "flamingo"),
          "cell tokens": finished(RESULTS / "cells",
                                  RESULTS / "cells" / "registers")}
for name, rows in sweeps.items():
  # (machine and wall time are the sweep's records: none for a run that
  # was trained before the sweep adopted its directory)
  machines = sorted({r["machine"] or "machine not recorded" for r in rows})
  print(f"{name}: {len(rows)} finished runs of {rows[0]['total_steps']} "
        f"steps of {rows[0]['batch_size']} on {', '.join(machines)}")


def datasets(row):
  """(test, compositional or None): the eval datasets of the vqa metrics."""
  names = sorted({k.split("/")[1] for k in row
                  if k.startswith("eval/") and k.endswith("/vqa/accuracy")})
  test = [n for n in names if "_val" not in n and "compositional" not in n]
  comp = [n for n in names if "compositional" in n]
  return test[0], (comp[0] if comp else None)


def accuracy(row, dataset, evaluator="vqa", name="accuracy"):
  value = row.get(f"eval/{dataset}/{evaluator}/{name}") if dataset else None
  return None if value is None else 100 * value


# %%
for name, rows in sweeps.items():
  print(f"\n{name}\n")
  print("| model | test | " + " | ".join(FAMILIES) + " | compositional | "
        "without audio | without image | train examples/s | wall time (s) |")
  print("|---" * (len(FAMILIES) + 7) + "|")
  for r in rows:
    test, comp = datasets(r)
    families = [cell(accuracy(r, test, name=f"accuracy/{f}"), ".1f")
                for f in FAMILIES]
    missing = [cell(accuracy(r, test, "missing_modality",
                             f"without_{m}/accuracy"), ".1f")
               for m in ("audio", "image")]
    print(f"| {label(r)} | {cell(accuracy(r, test), '.1f')} | "
          + " | ".join(families)
          + f" | {cell(accuracy(r, comp), '.1f')} | " + " | ".join(missing)
          + f" | {cell(r['examples_per_sec'])} | {cell(r['wall_time_s'])} |")

# %%
fig, axes = plt.subplots(len(sweeps), 1, figsize=(10, 3.4 * len(sweeps)))
x = np.arange(len(FAMILIES))
for ax, (name, rows) in zip(axes, sweeps.items()):
  width = 0.8 / len(rows)
  for i, r in enumerate(rows):
    test, _ = datasets(r)
    values = [accuracy(r, test, name=f"accuracy/{f}") or 0 for f in FAMILIES]
    ax.bar(x + i * width, values, width, label=label(r))
  ax.set_xticks(x + width * (len(rows) - 1) / 2, FAMILIES, rotation=20)
  for j, family in enumerate(FAMILIES):
    if family in TWO_MODALITIES:
      ax.axvspan(j - 0.1, j + 0.9, color="0.92", zorder=-1)
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 100)
  ax.legend(fontsize=7, ncol=4)
  ax.set_title(f"{name}, {rows[0]['total_steps']} steps: per question family "
               "(shaded: needs image and audio)")
fig.tight_layout()
fig.savefig(FIGURES / "digits_qa.png", dpi=120)
