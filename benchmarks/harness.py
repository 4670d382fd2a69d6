"""What every benchmark shares: timing, one JSON row per measurement, and
mmjax's real train step (the trainer's `make_train_step`, jitted with the
trainer's shardings) on a fixed batch.

Rows carry the machine and versions (`mmjax.hardware.describe`), the median
ms per step over `iters` timed calls after `warmup` untimed ones, examples/s,
and MFU against the measured peak (`mmjax.hardware.peak_flops`).
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

from mmjax import configs, experiment, hardware, parallel, train

WARMUP, ITERS = 3, 10


def time_ms(call: Callable[[], object], warmup: int = WARMUP,
            iters: int = ITERS) -> float:
  """Median wall time of `call()` in ms; `call` must block until done."""
  for _ in range(warmup):
    call()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def emit(row: dict):
  """Prints one JSON line: the machine and versions, then `row`."""
  print(json.dumps({**hardware.describe(), **row}), flush=True)


def step_row(name: str, framework: str, ms: float, batch_size: int,
             flops: float | None = None, **extra) -> dict:
  row = {"benchmark": name, "framework": framework, "ms_per_step": round(ms, 2),
         "examples_per_sec": round(batch_size / ms * 1e3, 1),
         "batch_size": batch_size}
  if flops:
    row["gflop_per_step"] = round(flops / 1e9, 3)
    row["mfu"] = round(flops / (ms / 1e3) / hardware.peak_flops(), 4)
  return {**row, **extra}


def load_config(spec: str, **overrides):
  """A config file (`configs/X.py:ARGS`) with `KEY=VALUE` overrides."""
  return configs.apply_overrides(configs.load_config(spec),
                                 [f"{k}={v}" for k, v in overrides.items()])


class MmjaxStep:
  """mmjax's train step on the fixed numpy `batch`, for `config` or for the
  built `run` (`mmjax.experiment.build`: its model, optimizer and state).

  `run()` takes one step (forward, backward, optimizer update) from the same
  initial state every call and blocks until it is done; `flops` is XLA's
  count for one step; `num_params` the model's parameter count.
  `compiler_options`: XLA's (`{}`: its defaults), by default mmjax's
  (`mmjax.hardware.compiler_options`).
  """

  def __init__(self, config, batch: dict, run=None,
               compiler_options: dict | None = None):
    if run is None:
      mesh = parallel.make_mesh(config.mesh_devices, config.get("mesh"))
      model = experiment.build_model(config)
      tx, _ = experiment.build_optimizer(config)
      spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
              for k, v in batch.items()}
      state, shardings = experiment.create_train_state(config, model, tx,
                                                       spec, mesh)
      method = None
    else:
      mesh, model, tx = run.mesh, run.model, run.tx
      state, shardings, method = run.state, run.shardings, run.method
    self.state = state
    self.batch = jax.device_put(batch, parallel.batch_sharding(mesh))
    self.compiled, self.flops = train.compile_train_step(
        config, model, tx, method, mesh, shardings, state, self.batch,
        donate=False, compiler_options=compiler_options)
    self.num_params = sum(x.size for x in jax.tree.leaves(state.params))

  def run(self):
    jax.block_until_ready(self.compiled(self.state, self.batch))

  def first_loss(self) -> float:
    """The loss of the step from the initial state."""
    return float(self.compiled(self.state, self.batch)[1]["loss"])


def parser(doc: str, batch: int) -> argparse.ArgumentParser:
  """The flags every step benchmark has: --batch, --iters and
  --xla-defaults."""
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument("--batch", type=int, default=batch)
  p.add_argument("--iters", type=int, default=ITERS)
  p.add_argument("--xla-defaults", action="store_true",
                 help="also time mmjax's step compiled with XLA's default "
                 "options instead of mmjax's (framework 'mmjax/xla-defaults')")
  return p


def emit_xla_defaults_row(name: str, config, batch: dict, iters: int,
                          **extra):
  """Times and emits mmjax's step for `config` compiled with XLA's default
  options: beside the 'mmjax' row, what `mmjax.hardware.compiler_options`
  is worth."""
  step = MmjaxStep(config, batch, compiler_options={})
  ms = time_ms(step.run, iters=iters)
  emit(step_row(name, "mmjax/xla-defaults", ms, len(next(iter(batch.values()))),
                step.flops, num_params=step.num_params, **extra))


def import_torch():
  """torch on as many threads as the cores this process may use (as XLA
  uses), or None (with a note) when it is not installed."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("torch is not installed: pip install torch==2.13.0 (the CPU build: "
          "--index-url https://download.pytorch.org/whl/cpu); mmjax rows only",
          file=sys.stderr)
    return None
  torch.set_num_threads(hardware.cpu_count())
  return torch


def emit_torch_comparison(name: str, mmjax_ms: float, flops: float,
                          reference, batch_size: int, iters: int, **extra):
  """Times the PyTorch twin (`reference.run()`: one step; `num_params`),
  emits its row and then the `speed_vs_torch` row (PyTorch ms / mmjax ms)."""
  import torch  # pylint: disable=import-outside-toplevel
  torch_ms = time_ms(reference.run, iters=iters)
  emit(step_row(name, "torch", torch_ms, batch_size, flops,
                num_params=reference.num_params, **extra,
                torch=torch.__version__,
                torch_threads=torch.get_num_threads()))
  emit({"benchmark": name, "speed_vs_torch": round(torch_ms / mmjax_ms, 3)})


def seeded_batch(shapes: dict, seed: int = 0) -> dict:
  """{key: (dtype, shape, high)} -> a batch of arrays of those shapes:
  integers uniform in [0, high), booleans all True (every modality present),
  floats standard normal."""
  rng = np.random.default_rng(seed)
  batch = {}
  for key, (dtype, shape, high) in shapes.items():
    if np.issubdtype(dtype, np.integer):
      batch[key] = rng.integers(0, high, shape).astype(dtype)
    elif dtype == np.bool_:
      batch[key] = np.ones(shape, bool)
    else:
      batch[key] = rng.normal(size=shape).astype(dtype)
  return batch
