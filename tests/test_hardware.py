"""The measured CPU peak (cached once per machine) and the compilation cache."""

import json
import subprocess
import sys

from mmjax import hardware


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
  monkeypatch.setenv("MMJAX_CACHE_DIR", str(tmp_path))
  probes = []
  monkeypatch.setattr(hardware, "measure_cpu_peak_flops",
                      lambda: probes.append(1) or 123e9)
  assert hardware.peak_flops() == 123e9
  assert hardware.peak_flops() == 123e9
  assert len(probes) == 1
  (key, value), = json.loads((tmp_path / "cpu_peak.json").read_text()).items()
  assert value == 123e9 and hardware.cpu_model() in key
  assert hardware.peak_flops(override=5e9) == 5e9


def test_the_probe_measures_a_plausible_rate():
  # Between 1 GFLOP/s and 100 TFLOP/s on any CPU this suite runs on.
  assert 1e9 < hardware.measure_cpu_peak_flops() < 1e14


# A fresh process each (jax's config is process-wide): `cli.main` points the
# cache under MMJAX_CACHE_DIR unless JAX_COMPILATION_CACHE_DIR chose one.
CACHE_SCRIPT = """
import jax, jax.numpy as jnp
from mmjax import cli
def run(argv):
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  print(jax.config.jax_compilation_cache_dir)
  jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((64, 64))).block_until_ready()
cli.main(run, cli.Program("x", "usage: x", {}, required=()), [])
"""


def cache_directory_used(env: dict) -> str:
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", **env}
  return subprocess.run([sys.executable, "-c", CACHE_SCRIPT], env=env,
                        check=True, capture_output=True,
                        text=True).stdout.strip()


def test_entry_points_turn_on_the_persistent_compilation_cache(tmp_path):
  assert cache_directory_used({"MMJAX_CACHE_DIR": str(tmp_path)}) == str(
      tmp_path / "jax")
  assert any((tmp_path / "jax").iterdir())  # the program was written


def test_a_chosen_cache_directory_is_kept(tmp_path):
  chosen = tmp_path / "chosen"
  assert cache_directory_used({"MMJAX_CACHE_DIR": str(tmp_path / "mmjax"),
                               "JAX_COMPILATION_CACHE_DIR": str(chosen)}
                              ) == str(chosen)
  assert any(chosen.iterdir()) and not (tmp_path / "mmjax" / "jax").exists()


def test_compiler_options_keep_ynnpack_for_dots_only_unless_xla_flags_say(
    monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert hardware.compiler_options() == {
      "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
  monkeypatch.setenv("XLA_FLAGS",
                     "--xla_cpu_experimental_ynn_fusion_type=reduce")
  assert hardware.compiler_options() == {}


def test_xla_honours_the_compiler_options_per_computation(monkeypatch):
  """XLA's default puts an elementwise-and-reduce computation in a
  YNNPACK fusion; with mmjax's options (YNNPACK for dots only) it does not."""
  import jax
  import jax.numpy as jnp
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  f = lambda x: jnp.tanh(x * 2.0 + 1.0).sum(0)
  x = jnp.ones((64, 256))
  texts = {name: jax.jit(f, compiler_options=opts).lower(x).compile().as_text()
           for name, opts in [("xla", {}),
                              ("mmjax", hardware.compiler_options())]}
  assert "ynn" in texts["xla"].lower()
  assert "ynn" not in texts["mmjax"].lower()
