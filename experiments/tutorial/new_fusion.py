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
# # Tutorial: a new fusion from mmjax's parts
#
# We build the Gated Multimodal Unit (Arevalo et al., "Gated Multimodal Units
# for Information Fusion", ICLR Workshops 2017) in a module of our own,
# outside mmjax, train it on AV-MNIST with the ordinary trainer by naming it
# with an import string, and compare it with late fusion at the same budget,
# including accuracy when a modality is missing.
#
# A fusion is a Flax module called as
# `fusion(tokens: {modality: [B, N_m, D_m]}, masks: {modality: [B]}, train)`
# that returns a fused representation `[B, D]`; the model's MLP head maps it
# to logits. A modality whose mask is False must contribute nothing.
#
# Budget: `MMJAX_TUTORIAL_STEPS` training steps of 128 examples (default 300),
# evaluated on `MMJAX_EVAL_SPLIT` (default the 10,000 test pairs; CI runs 3
# steps and evaluates on "test[:256]"). Data: `avmnist`, built from the
# repo's data/ into `$TFDS_DATA_DIR` on first use.

# %%
import inspect
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt

import mmjax
from mmjax import configs, experiment, results, train

REPO = pathlib.Path(mmjax.__file__).resolve().parents[1]
STEPS = int(os.environ.get("MMJAX_TUTORIAL_STEPS", "300"))
EVAL_SPLIT = os.environ.get("MMJAX_EVAL_SPLIT", "test")
WORKDIR = pathlib.Path(os.environ.get("MMJAX_WORKDIR", "/tmp/mmjax_tutorial"))
FIGURES = pathlib.Path(os.environ.get("MMJAX_FIGURES", "."))

# %% [markdown]
# ## The fusion
#
# `gmu.py` beside this notebook stands for a user's own package. For each
# modality m, the GMU computes a candidate `h_m = tanh(W_m x_m)` from its
# pooled features `x_m`, and a gate from all modalities together,
# `z = W_z [x_1; ...; x_M]` (one score per modality and feature). The fused
# vector is `sum_m softmax_m(z)_m * h_m`; with two modalities the softmax is
# the paper's `z * h_1 + (1 - z) * h_2` with `z = sigmoid(z_1 - z_2)`. A
# missing modality gets gate score minus infinity and zero features, so the
# softmax renormalises over the modalities present.

# %%
sys.path.insert(0, str(REPO / "experiments" / "tutorial"))
from gmu import GatedMultimodalUnit  # noqa: E402  (a user's own module)

print(inspect.getsource(GatedMultimodalUnit))


# %% [markdown]
# Two checks every fusion in mmjax passes: a masked modality does not change
# the output, and an example with every modality masked gives finite numbers.

# %%
rng = jax.random.PRNGKey(0)
tokens = {"image": jax.random.normal(rng, (4, 9, 48)),
          "audio": jax.random.normal(jax.random.fold_in(rng, 1), (4, 9, 192))}
masks = {"image": jnp.array([True, True, False, False]),
         "audio": jnp.array([True, False, True, False])}
gmu = GatedMultimodalUnit()
params = gmu.init(rng, tokens, masks)
out = gmu.apply(params, tokens, masks)
noised = dict(tokens, audio=tokens["audio"] + 100.0)
changed = jnp.abs(gmu.apply(params, noised, masks) - out).max(-1)
print("output", out.shape, "| change per example when the audio is noised:",
      changed.round(4))
assert float(changed[1]) == 0.0 and float(changed[3]) == 0.0  # audio masked
assert bool(jnp.isfinite(out).all())

# %% [markdown]
# ## Train it by import string
#
# Every name a config chooses (fusion, encoder, evaluator, training method)
# may be an import string `module:Name`, so the GMU trains without editing
# mmjax: here in this kernel, and the same from a shell or in a sweep,
#
#     PYTHONPATH=experiments/tutorial python -m mmjax.sweep \
#         --config configs/avmnist.py --workdir /tmp/gmu --grid "seed=0,1" \
#         --config.model.fusion=gmu:GatedMultimodalUnit
#
# Both runs use the same recipe (LeNet encoders, MLP head, AdamW) and seed.

# %%
FUSIONS = {"gmu": "gmu:GatedMultimodalUnit", "late": "late"}


def run(name: str) -> dict:
  """Trains (or resumes) fusion `name` for STEPS steps; returns its final
  metrics."""
  config = configs.load_config(f"{REPO}/configs/avmnist.py:steps={STEPS}")
  config = configs.apply_overrides(config, [
      f"model.fusion={FUSIONS[name]}",
      f"eval_splits=('{EVAL_SPLIT}',)", f"log_every={max(1, STEPS // 10)}",
      f"checkpoint_every={STEPS}", "optimizer.warmup_steps=0"])
  experiment.check_config(config)
  workdir = WORKDIR / f"{name}_{STEPS}"
  train.train(config, str(workdir))
  rows = [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]
  final = {}
  for row in rows:
    final.update(row)
  return final


finals = {name: run(name) for name in FUSIONS}

# %% [markdown]
# ## Results

# %%
prefix = f"eval/{results.eval_name('avmnist', EVAL_SPLIT)}/"
metrics = {"both": prefix + "classification/accuracy",
           "without audio": prefix + "missing_modality/without_audio/accuracy",
           "without image": prefix + "missing_modality/without_image/accuracy"}
print(f"{STEPS} steps of 128, seed 0; accuracy (%) on {EVAL_SPLIT}")
print("| fusion | " + " | ".join(metrics) + " | parameters |")
print("|---|" + "---|" * (len(metrics) + 1))
for fusion, final in finals.items():
  cells = " | ".join(f"{100 * final[key]:.2f}" for key in metrics.values())
  print(f"| {fusion} | {cells} | {final['num_params']:,} |")

fig, ax = plt.subplots(figsize=(6, 3.2))
width = 0.38
for i, (fusion, final) in enumerate(finals.items()):
  xs = [j + (i - 0.5) * width for j in range(len(metrics))]
  ax.bar(xs, [100 * final[k] for k in metrics.values()], width, label=fusion)
ax.set_xticks(range(len(metrics)), list(metrics))
ax.set_ylabel(f"accuracy on {EVAL_SPLIT} (%)")
ax.set_title(f"AV-MNIST, {STEPS} steps, seed 0")
ax.legend()
fig.tight_layout()
fig.savefig(FIGURES / "new_fusion.png", dpi=120)

# %% [markdown]
# The GMU learns, per feature, how much to trust each modality; late fusion
# averages two independent classifiers. Read the table with one seed in mind:
# differences of a point or two are within seed noise at this budget
# (`experiments/avmnist_fusion` has three seeds of every built-in fusion).
