"""Every notebook under experiments/ executes, so that none can rot.

Each experiment folder holds `sweep.sh` and a notebook `<name>.py`
(jupytext percent format) paired with `<name>.ipynb`. Here each sweep runs
its `smoke` grid (3 steps per point, 64 test examples) and the notebook
executes on those results in a Jupyter kernel; the tutorial trains for 3
steps. The committed `.ipynb` files must hold the same cells as their `.py`.
"""

import ast
import os
import pathlib
import subprocess
import sys
from unittest import mock

import jupytext
import nbclient
import pytest


REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.parent for p in REPO.glob("experiments/*/sweep.sh"))
NOTEBOOKS = sorted(p for p in REPO.glob("experiments/*/*.py")
                   if p.read_text().startswith("# ---\n# jupyter:"))


@pytest.fixture(scope="session")
def tfds_dir(avmnist_data_dir):
  return avmnist_data_dir


def environment(tfds_dir, **extra) -> dict:
  """Single-device CPU JAX reading the test's built datasets; sweep.sh runs
  this test's interpreter (`PYTHON`), not whatever python is first on PATH."""
  return {**os.environ, "TFDS_DATA_DIR": str(tfds_dir), "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": "", "PYTHON": sys.executable, **extra}


def execute(notebook: pathlib.Path, env: dict):
  """Runs every cell of the jupytext notebook in a fresh Python kernel."""
  nb = jupytext.read(notebook)
  client = nbclient.NotebookClient(
      nb, timeout=900, kernel_name="python3",
      resources={"metadata": {"path": str(notebook.parent)}})
  with mock.patch.dict(os.environ, env, clear=True):
    client.execute()
  return nb


def test_every_experiment_has_a_notebook():
  assert EXPERIMENTS, "no experiments/*/sweep.sh found"
  for experiment in EXPERIMENTS:
    assert (experiment / f"{experiment.name}.py") in NOTEBOOKS, experiment


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_paired_ipynb_has_the_same_cells(notebook):
  paired = notebook.with_suffix(".ipynb")
  assert paired.exists(), f"{paired} missing: jupytext --sync {notebook}"
  cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]
  assert cells(jupytext.read(paired)) == cells(jupytext.read(notebook)), (
      f"{paired.name} differs from {notebook.name}: jupytext --sync {notebook}")


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.name)
def test_notebook_runs_on_its_smoke_sweep(experiment, tmp_path, tfds_dir):
  env = environment(tfds_dir)
  sweep = subprocess.run(
      ["bash", str(experiment / "sweep.sh"), str(tmp_path / "sweep"), "smoke"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
  assert (tmp_path / "sweep" / "results.json").exists()
  execute(experiment / f"{experiment.name}.py",
          {**env, "MMJAX_RESULTS": str(tmp_path / "sweep"),
           "MMJAX_FIGURES": str(tmp_path)})
  assert list(tmp_path.glob("*.png"))


def test_tutorial_runs(tmp_path, tfds_dir):
  execute(REPO / "experiments" / "tutorial" / "new_fusion.py",
          environment(tfds_dir, MMJAX_TUTORIAL_STEPS="3",
                      MMJAX_EVAL_SPLIT="test[:256]",
                      MMJAX_WORKDIR=str(tmp_path / "runs"),
                      MMJAX_FIGURES=str(tmp_path)))
  assert (tmp_path / "new_fusion.png").exists()


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.name)
def test_result_notebooks_import_no_jax_and_no_runner(experiment):
  """A notebook that reads results imports them through mmjax.results, which
  (like the notebook) imports neither jax nor a subprocess runner."""
  tree = ast.parse((experiment / f"{experiment.name}.py").read_text())
  imported = {alias.name for node in ast.walk(tree)
              if isinstance(node, ast.Import) for alias in node.names}
  imported |= {node.module for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom)}
  assert not imported & {"jax", "subprocess", "mmjax.sweep", "mmjax.train"}


def test_the_results_module_imports_no_jax():
  code = ("import sys, mmjax.results\n"
          "print([m for m in ('jax', 'flax', 'subprocess') if m in sys.modules])")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
  assert result.stdout.strip() == "[]", result.stdout + result.stderr
