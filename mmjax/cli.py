"""The command line of every entry point: argv -> options and locked config.

  python -m mmjax.{train,evaluate,sweep} --config configs/X.py[:ARGS] \
      --workdir DIR [--config.KEY=VALUE ...] [--help]

`parse_flags` reads `--NAME VALUE`, `--NAME=VALUE` and `--config.KEY=VALUE`
for the flags an entry point declares; `parse_command_line` adds loading the
config and applying the overrides (`mmjax.configs`); `main` runs an entry
point so that bad input (`UsageError`) prints one `error: ...` line and exits
with status 2, without a traceback, and `--help` prints the usage, the flags
and, with `--config X.py`, that config's docstring (its arguments after the
colon).
"""

import dataclasses
import signal
import sys
from collections.abc import Callable, Mapping, Sequence

from mmjax import configs, distributed
from mmjax.errors import UsageError

INTERRUPTED = 130  # exit status after SIGINT (128 + 2), as a shell reports it
PREEMPTED = 143  # mmjax.train's exit status after SIGTERM (128 + 15)


@dataclasses.dataclass(frozen=True)
class Program:
  """An entry point's usage line and flags ({"--workdir": "help text"})."""
  name: str
  usage: str
  flags: Mapping[str, str]
  required: Sequence[str] = ("--config", "--workdir")

  def help(self) -> str:
    width = max(len(f) for f in self.flags) + 2
    lines = [self.usage, "", "flags:"]
    lines += [f"  {flag:<{width}}{text}" for flag, text in self.flags.items()]
    lines.append(f"  {'--config.KEY=VALUE':<{width}}override a config key "
                 "(dotted; configs are locked, so a misspelt key is an error)")
    return "\n".join(lines)


CONFIG_FLAGS = {
    "--config": "configs/X.py[:ARGS], the config file and its arguments",
    "--workdir": "the run's directory: checkpoints, metrics.jsonl, "
                 "config.json, tensorboard/",
}
# Multi-host runs (`mmjax.distributed`): every process runs the same command.
RUN_FLAGS = {**CONFIG_FLAGS, **distributed.FLAGS}
TRAIN = Program(
    "train", "usage: python -m mmjax.train --config configs/X.py[:ARGS] "
    "--workdir DIR [--config.KEY=VALUE ...]", RUN_FLAGS)
EVALUATE = Program(
    "evaluate", "usage: python -m mmjax.evaluate --config configs/X.py[:ARGS] "
    "--workdir DIR [--config.KEY=VALUE ...]", RUN_FLAGS)


def parse_flags(argv: Sequence[str], program: Program
                ) -> tuple[dict[str, str], list[str]]:
  """argv (without the program) -> ({"config": ..., ...}, ["KEY=VALUE"]).

  Raises UsageError for an unknown argument, a flag without its value or a
  missing required flag.
  """
  options, overrides = {}, []
  args = list(argv)
  while args:
    arg = args.pop(0)
    name, eq, value = arg.partition("=")
    if name in program.flags:
      if not eq:
        if not args:
          raise UsageError(f"{name} needs a value; {program.usage}")
        value = args.pop(0)
      options[name[2:]] = value
    elif name.startswith("--config.") and name != "--config.":
      if not eq:
        raise UsageError(f"override '{arg}' needs a value: {name}=VALUE")
      overrides.append(arg[len("--config."):])
    else:
      raise UsageError(f"unknown argument '{arg}'; {program.usage}")
  for required in program.required:
    if not options.get(required[2:]):
      raise UsageError(f"{required} is missing; {program.usage}")
  return options, overrides


def parse_config_and_flags(argv: Sequence[str], program: Program):
  """argv (without the program) -> (locked, checked config, {flag: value})."""
  # Imported here: checking names the registries, which import jax and flax.
  from mmjax import experiment  # pylint: disable=import-outside-toplevel
  options, overrides = parse_flags(argv, program)
  config = configs.apply_overrides(configs.load_config(options["config"]),
                                   overrides)
  experiment.check_config(config)
  return config, options


def parse_command_line(argv: Sequence[str], program: Program | str = TRAIN):
  """argv (without the program) -> (locked, checked config, workdir)."""
  if isinstance(program, str):
    program = {"train": TRAIN, "evaluate": EVALUATE}[program]
  config, options = parse_config_and_flags(argv, program)
  return config, options["workdir"]


def help_text(argv: Sequence[str], program: Program) -> str:
  """The usage and flags, then the docstring of the config `--config` names
  (if it loads)."""
  text = program.help()
  args = list(argv)
  for i, arg in enumerate(args):
    spec = (arg.partition("=")[2] if arg.startswith("--config=") else
            args[i + 1] if arg == "--config" and i + 1 < len(args) else None)
    if spec:
      try:
        text += f"\n\n{spec.partition(':')[0]}:\n{configs.docstring(spec)}"
      except UsageError as e:
        text += f"\n\nerror: {e}"
  return text


def quiet_libraries():
  """Library chatter off: absl warnings, and tfds progress bars unless on a
  terminal, so that errors stay one line."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.ERROR)
  if not sys.stderr.isatty():
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    tfds.disable_progress_bar()


_interrupted = False  # SIGINT seen since `main` began (`_on_sigint`)


def _on_sigint(*_):
  """SIGINT's handler: KeyboardInterrupt where Python is running, as the
  default one raises, and a record of it. Python drops an exception raised
  inside some callbacks (jax's garbage-collection callback: "Exception
  ignored in ..."), so a long loop also asks `raise_if_interrupted`."""
  global _interrupted  # pylint: disable=global-statement
  _interrupted = True
  raise KeyboardInterrupt


def raise_if_interrupted():
  """KeyboardInterrupt if SIGINT arrived under `main` (its own may have
  been dropped)."""
  if _interrupted:
    raise KeyboardInterrupt


def main(run: Callable[[Sequence[str]], int | None], program: Program,
         argv: Sequence[str] | None = None,
         errors: Mapping[type, int] | None = None) -> int:
  """Runs `run(argv)` as an entry point; returns the exit status.

  `--help` (or `-h`) anywhere prints `help_text` and returns 0. UsageError:
  `error: <message>` on stderr, 2. An exception type in `errors` prints its
  message the same way and returns its status. KeyboardInterrupt (SIGINT,
  also when the process was started with SIGINT ignored, as a shell does for
  a background job): 130; the caller's SIGINT handler is back on return. JAX's persistent compilation cache is on
  (`mmjax.hardware.enable_compilation_cache`). A program with the
  multi-host flags starts `jax.distributed` first where they or the
  environment describe a cluster (`mmjax.distributed.initialize`).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--help" in argv or "-h" in argv:
    print(help_text(argv, program))
    return 0
  global _interrupted  # pylint: disable=global-statement
  _interrupted = False
  previous_handler = signal.signal(signal.SIGINT, _on_sigint)
  quiet_libraries()
  from mmjax import hardware  # pylint: disable=import-outside-toplevel
  errors = {UsageError: 2, **(errors or {})}
  try:
    if "--coordinator" in program.flags:  # before anything touches a device
      options, _ = parse_flags(argv, program)
      distributed.initialize(*(options.get(f[2:]) for f in distributed.FLAGS))
    hardware.enable_compilation_cache()
    return run(argv) or 0
  except tuple(errors) as e:
    print(f"error: {e}", file=sys.stderr)
    return next(code for kind, code in errors.items() if isinstance(e, kind))
  except KeyboardInterrupt:
    return INTERRUPTED
  finally:  # a caller (a notebook, a test) gets its SIGINT handling back
    signal.signal(signal.SIGINT, previous_handler)
    _interrupted = False
