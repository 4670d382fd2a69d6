"""Temporary memory of a train step with the memory levers on and off.

  python benchmarks/memory.py

XLA's `compiled.memory_analysis().temp_size_in_bytes` (activations and
other buffers the step allocates, without its inputs and outputs) of:

  remat   the gradient of a ViT (width 192, depth 6, 64x64 images in 8x8
          patches) + 2-layer BERT SigLIP model, batch 32, float32, for each
          `config.remat` policy, with the layers unrolled and scanned
          (`config.scan_layers`);
  accum   the `configs/avmnist.py` concat train step, batch 128, with
          `config.grad_accum_steps` 1, 2 and 4;
  coca    the gradient of a CoCa model (vocabulary 8,192, 32 tokens, batch
          64) with 1 and 4 microbatches, GradCache caching every output
          (the [B, L, V] logits too) or only the embeddings
          (`objectives.CacheSplit`).

One JSON row per measurement. Nothing is run, only compiled, so the figures
do not depend on what else the machine is doing.
"""

import jax
import numpy as np

import harness
from mmjax import accumulate, experiment, losses, objectives, parallel, train
from mmjax.models.coca import build_coca, coca_objective
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


def coca_rows(batch_size: int = 64, length: int = 32, vocab: int = 8192):
  rng = np.random.default_rng(0)
  batch = {"image": rng.random((batch_size, 32, 32, 1), np.float32),
           "text": rng.integers(3, vocab, (batch_size, length)).astype(
               np.int32)}
  model = build_coca(image_encoder={"name": "lenet", "features": 8,
                                    "extra_layers": 1},
                     vocab_size=vocab, width=64, unimodal_layers=2,
                     multimodal_layers=2, num_heads=2, mlp_dim=128,
                     max_length=length + 2, embed_dim=64, num_queries=8,
                     bos_id=2)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))
  objective = coca_objective()
  split = objectives.cache_split(objective)
  for k, cache in ((1, "-"), (4, "every output"), (4, "embeddings")):
    fn = accumulate.gradient_fn(k, whole_batch=True,
                                split=split if cache == "embeddings" else None)

    def grads(variables, fn=fn):
      forward = lambda p, b, rng: model.apply({**variables, "params": p}, b,
                                              mutable=["intermediates"])
      return fn(forward, objective, variables["params"], batch,
                jax.random.key(0))[0]

    compiled = jax.jit(grads).lower(variables).compile()
    harness.emit({"benchmark": "memory/coca_grad_accum",
                  "grad_accum_steps": k, "cached": cache,
                  "batch_size": batch_size, "vocab_size": vocab,
                  "temp_mib": mib(compiled)})


if __name__ == "__main__":
  remat_rows()
  accum_rows()
  coca_rows()
