"""Temporary memory of a train step with the memory levers on and off.

  python benchmarks/memory.py

XLA's `compiled.memory_analysis().temp_size_in_bytes` (activations and
other buffers the step allocates, without its inputs and outputs) of:

  remat   the gradient of a ViT (width 192, depth 6, 64x64 images in 8x8
          patches) + 2-layer BERT SigLIP model, batch 32, float32, for each
          `config.remat` policy, with the layers unrolled and scanned
          (`config.scan_layers`);
  accum   the `configs/avmnist.py` concat train step, batch 128, with
          `config.grad_accum_steps` 1, 2 and 4.

One JSON row per measurement. Nothing is run, only compiled, so the figures
do not depend on what else the machine is doing.
"""

import jax
import numpy as np

import harness
from mmjax import experiment, losses, objectives, parallel, train
from mmjax.models.factory import build_contrastive

VIT = {"name": "vit", "width": 192, "depth": 6, "mlp_dim": 768,
       "num_heads": 3, "patch_size": 8}
BERT = {"name": "bert", "vocab_size": 30, "hidden_size": 64, "num_layers": 2,
        "num_heads": 2, "intermediate_size": 128,
        "max_position_embeddings": 16}
POLICIES = ("none", "nothing_saveable", "dots_saveable",
            "dots_with_no_batch_dims_saveable")


def mib(compiled) -> float:
  return round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1)


def remat_rows(batch_size: int = 32):
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 255, (batch_size, 64, 64, 3), np.uint8),
           "text": rng.integers(1, 30, (batch_size, 16)).astype(np.int32)}
  for scan in (False, True):
    for policy in POLICIES:
      model = build_contrastive(modalities=("image", "text"),
                                encoders={"image": VIT, "text": BERT},
                                embed_dim=64, objective="sigmoid",
                                remat=policy, scan_layers=scan)
      params = jax.eval_shape(
          lambda m=model: m.init(jax.random.key(0), batch))["params"]

      def loss(p, m=model):
        out = m.apply({"params": p}, batch, train=True)
        return losses.sigmoid_contrastive_loss(
            out["embedding/image"], out["embedding/text"], out["log_scale"],
            out["bias"])[0]

      compiled = jax.jit(jax.grad(loss)).lower(params).compile()
      harness.emit({"benchmark": "memory/remat", "remat": policy,
                    "scan_layers": scan, "batch_size": batch_size,
                    "temp_mib": mib(compiled)})


def accum_rows():
  config = harness.load_config("configs/avmnist.py")
  shapes = {"image": (np.uint8, (128, 28, 28, 1), 256),
            "audio": (np.uint8, (128, 112, 112, 1), 256),
            "mask/image": (np.bool_, (128,), 0),
            "mask/audio": (np.bool_, (128,), 0),
            "label": (np.int32, (128,), 10)}
  batch = harness.seeded_batch(shapes)
  mesh = parallel.make_mesh(config.mesh_devices, config.get("mesh"))
  model = experiment.build_model(config)
  tx, _ = experiment.build_optimizer(config)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  state, _ = experiment.create_train_state(config, model, tx, spec, mesh)
  objective = objectives.objective_of(config, mesh)
  for k in (1, 2, 4):
    compiled = jax.jit(train.make_train_step(
        model, tx, objective, grad_accum_steps=k, mesh=mesh)).lower(
            state, batch).compile()
    harness.emit({"benchmark": "memory/grad_accum", "config": "avmnist concat",
                  "grad_accum_steps": k, "batch_size": 128,
                  "temp_mib": mib(compiled)})


if __name__ == "__main__":
  remat_rows()
  accum_rows()
