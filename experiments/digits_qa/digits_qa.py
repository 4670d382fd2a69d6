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
# Sweep: `bash experiments/digits_qa/sweep.sh DIR`; reads
# `$MMJAX_RESULTS/results.json` and `$MMJAX_RESULTS/flamingo/results.json`
# (default: the results committed here).

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
rows = [r for d in (RESULTS, RESULTS / "flamingo") if (d / "results.json").exists()
        for r in load_results(d) if r["status"] == "ok"]
rows.sort(key=lambda r: ORDER.index(r["model"]))
print(f"{len(rows)} finished runs of {rows[0]['total_steps']} steps of "
      f"{rows[0]['batch_size']} on {rows[0]['machine']}")


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
print("| model | test | " + " | ".join(FAMILIES) +
      " | compositional | without audio | without image | train examples/s |")
print("|---" * (len(FAMILIES) + 6) + "|")
for r in rows:
  test, comp = datasets(r)
  families = [cell(accuracy(r, test, name=f"accuracy/{f}"), ".1f")
              for f in FAMILIES]
  missing = [cell(accuracy(r, test, "missing_modality",
                           f"without_{m}/accuracy"), ".1f")
             for m in ("audio", "image")]
  print(f"| {r['model']} | {cell(accuracy(r, test), '.1f')} | "
        + " | ".join(families)
        + f" | {cell(accuracy(r, comp), '.1f')} | " + " | ".join(missing)
        + f" | {cell(r['examples_per_sec'])} |")

# %%
fig, ax = plt.subplots(figsize=(10, 3.6))
width = 0.8 / len(rows)
x = np.arange(len(FAMILIES))
for i, r in enumerate(rows):
  test, _ = datasets(r)
  values = [accuracy(r, test, name=f"accuracy/{f}") or 0 for f in FAMILIES]
  ax.bar(x + i * width, values, width, label=r["model"])
ax.set_xticks(x + width * (len(rows) - 1) / 2, FAMILIES, rotation=20)
for j, family in enumerate(FAMILIES):
  if family in TWO_MODALITIES:
    ax.axvspan(j - 0.1, j + 0.9, color="0.92", zorder=-1)
ax.set_ylabel("test accuracy (%)")
ax.set_ylim(0, 100)
ax.legend(fontsize=7, ncol=4)
ax.set_title("per question family (shaded: needs image and audio)")
fig.tight_layout()
fig.savefig(FIGURES / "digits_qa.png", dpi=120)
