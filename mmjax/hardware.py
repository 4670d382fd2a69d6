"""The machine a run is on: its description, peak FLOP/s for MFU, and the
user cache directory (the measured CPU peak and JAX's persistent compilation
cache live there).

CPU peaks are measured, not looked up: a float32 matrix multiply probe on all
the cores this process may use, run once per machine and cached in
`cache_dir()/cpu_peak.json` (keyed by CPU model, core count and jax version).
Accelerator peaks are the vendors' dense bf16 figures.
"""

import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per device (vendor data sheets).
ACCELERATOR_PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}
PROBE_SIZE = 2048  # the probe multiplies two [PROBE_SIZE, PROBE_SIZE] arrays
PROBE_REPEATS = 8  # the best of this many timed multiplies


def cache_dir() -> pathlib.Path:
  """$MMJAX_CACHE_DIR, else $XDG_CACHE_HOME/mmjax, else ~/.cache/mmjax."""
  if os.environ.get("MMJAX_CACHE_DIR"):
    return pathlib.Path(os.environ["MMJAX_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "mmjax"


def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.partition(":")[2].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_count() -> int:
  """The cores this process may run on (its affinity, not the host's)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


# XLA:CPU options mmjax compiles its train, evaluation and generation steps
# with, unless XLA_FLAGS sets them. jaxlib 0.10 sends elementwise, reduction
# and dot fusions to YNNPACK by default; the first two make the AV-MNIST
# LeNet steps 1.6x slower than XLA's own fused loops, so only dot fusions
# stay with YNNPACK (benchmarks/README.md).
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def compiler_options() -> dict[str, str]:
  """Options for `jax.jit(..., compiler_options=...)` on this backend:
  `CPU_COMPILER_OPTIONS` on the CPU, less any that $XLA_FLAGS names (the
  user's flags win); nothing on accelerators."""
  if jax.default_backend() != "cpu":
    return {}
  flags = os.environ.get("XLA_FLAGS", "")
  return {k: v for k, v in CPU_COMPILER_OPTIONS.items()
          if f"--{k}" not in flags}


def describe() -> dict:
  """The machine and library versions, for benchmark rows."""
  device = jax.devices()[0]
  return {"cpu": cpu_model(), "cpu_cores": cpu_count(),
          "device": device.device_kind, "platform": device.platform,
          "num_devices": jax.device_count(), "jax": jax.__version__,
          "python": platform.python_version()}


def measure_cpu_peak_flops() -> float:
  """FLOP/s of the best of `PROBE_REPEATS` float32 [2048]^2 matmuls (~0.5 s)."""
  cpu = jax.devices("cpu")[0]
  a = jax.device_put(np.ones((PROBE_SIZE, PROBE_SIZE), np.float32), cpu)
  matmul = jax.jit(jnp.dot)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(PROBE_REPEATS):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * PROBE_SIZE**3 / best


def cpu_peak_flops() -> float:
  """The measured CPU peak, from the cache file or probed (and cached) now."""
  key = f"{cpu_model()} | {cpu_count()} cores | jax {jax.__version__}"
  path = cache_dir() / "cpu_peak.json"
  try:
    cached = json.loads(path.read_text())
  except (OSError, ValueError):
    cached = {}
  if not isinstance(cached.get(key), (int, float)):
    cached[key] = measure_cpu_peak_flops()
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_suffix(f".{os.getpid()}.tmp")
      tmp.write_text(json.dumps(cached, indent=1) + "\n")
      tmp.replace(path)
    except OSError:  # a read-only home: measured again next time
      pass
  return float(cached[key])


def peak_flops(override: float = 0.0) -> float:
  """Peak FLOP/s of all devices together (`override` if non-zero); NaN for
  an accelerator missing from the table."""
  if override:
    return override
  devices = jax.devices()
  if devices[0].platform == "cpu":
    return cpu_peak_flops()  # the whole host, however many CPU devices
  return ACCELERATOR_PEAK_FLOPS.get(devices[0].device_kind,
                                    float("nan")) * len(devices)


def enable_compilation_cache():
  """JAX's persistent compilation cache under `cache_dir()/jax`, unless the
  user chose a directory ($JAX_COMPILATION_CACHE_DIR or jax's config), so
  that a rerun or a resumed run skips XLA compilation."""
  if jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax"))
  # Also the small programs (evaluation, the methods' helpers): most of a
  # CPU run's compilations take well under jax's default 1 s threshold.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
