"""The command line shared by every entry point (mmjax/cli.py) and config
files as data (mmjax/configs)."""

import pathlib
import signal
import subprocess
import sys

import pytest

from mmjax import cli, evaluate, sweep, train

REPO = pathlib.Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"train": train.main, "evaluate": evaluate.main,
                "sweep": sweep.main}


def test_loading_every_config_imports_neither_flax_nor_jax():
  # Configs built around a checkpoint read the tiny test one.
  needs_checkpoint = ":clip=tests/data/clip_tiny_hf"
  files = sorted(str(p) + (needs_checkpoint if "clip=DIR" in p.read_text()
                           else "") for p in (REPO / "configs").glob("*.py"))
  assert len(files) >= 5
  code = ("import sys\nfrom mmjax import configs\n"
          f"for f in {files!r}:\n  configs.load_config(f)\n"
          "print(sorted(m for m in ('flax', 'jax', 'optax', 'tensorflow_"
          "datasets') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_entry_point_answers_help(name, capsys):
  assert ENTRY_POINTS[name](["--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"usage: python -m mmjax.{name} ")
  assert "--workdir" in out and "--config.KEY=VALUE" in out


def test_help_with_a_config_prints_its_docstring(capsys):
  assert train.main(["--config", "configs/avmnist.py", "--help"]) == 0
  out = capsys.readouterr().out
  assert "configs/avmnist.py:" in out
  assert "fusion=NAME" in out and "Expected result" in out


def one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  assert "Traceback" not in err[0]
  return err[0]


@pytest.mark.parametrize("source, message", [
    ("def get_config(arg=None):\n  return {\n", "line 2: SyntaxError"),
    ("import ml_collections\nX = 1 / 0\n",
     "line 2: ZeroDivisionError: division by zero"),
    ("def get_config(arg=None):\n  return {}['model']\n",
     "line 2: KeyError: 'model'"),
    ("CONFIG = 1\n", "defines no get_config"),
])
def test_a_config_file_that_fails_is_one_error_line(tmp_path, capsys, source,
                                                    message):
  path = tmp_path / "bad_config.py"
  path.write_text(source)
  for name, main in ENTRY_POINTS.items():
    argv = ["--config", str(path), "--workdir", str(tmp_path / "run")]
    if name == "sweep":
      argv += ["--grid", "seed=0"]
    assert main(argv) == 2, name
    line = one_error_line(capsys)
    assert str(path) in line and message in line, (name, line)
  assert not (tmp_path / "run").exists()


def test_unknown_argument_names_it_and_the_usage(capsys):
  assert train.main(["--confg", "x.py"]) == 2
  line = one_error_line(capsys)
  assert "unknown argument '--confg'" in line and "usage:" in line


def test_parse_flags_forms():
  options, overrides = cli.parse_flags(
      ["--config=c.py:smoke", "--workdir", "/w", "--config.seed=3"],
      cli.TRAIN)
  assert options == {"config": "c.py:smoke", "workdir": "/w"}
  assert overrides == ["seed=3"]


def test_a_sigint_whose_keyboardinterrupt_python_drops_still_stops():
  """Python ignores an exception raised in a finaliser ("Exception ignored
  in ..."), as in jax's garbage-collection callback; the run's loop still
  stops (`cli.raise_if_interrupted`) and the entry point returns 130."""
  dropped = []

  class Finalised:
    def __del__(self):
      try:
        signal.raise_signal(signal.SIGINT)
        for _ in range(1000):  # the handler runs here, in the finaliser
          pass
      except KeyboardInterrupt:
        dropped.append(True)
        raise

  def run(_):
    Finalised()  # finalised at once, the SIGINT's exception dropped
    cli.raise_if_interrupted()
    return 0

  program = cli.Program("x", "usage: x", {}, required=())
  handler = signal.getsignal(signal.SIGINT)
  assert cli.main(run, program, []) == cli.INTERRUPTED
  assert dropped  # the KeyboardInterrupt did go to the finaliser
  assert cli.main(lambda _: cli.raise_if_interrupted(), program, []) == 0
  # Nothing is left behind for the caller: its handler, no interrupt.
  assert signal.getsignal(signal.SIGINT) is handler
  assert cli.main(run, program, []) == cli.INTERRUPTED
  cli.raise_if_interrupted()
