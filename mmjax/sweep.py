"""Runs a grid of training runs and tabulates them: `python -m mmjax.sweep`.

  python -m mmjax.sweep --config configs/X.py[:ARGS] --workdir DIR \
      --grid "fusion=late,concat,perceiver seed=0,1,2" [--parallel N] \
      [--launcher subprocess|local|slurm [--time T] [slurm flags]] \
      [--config.KEY=VALUE ...]

Grid: space-separated axes `NAME=V1,V2,...`; the points are the product of
the axes (the first axis varies slowest). An axis named `config.KEY` (dotted,
e.g. `config.model.fusion_kwargs.fusion_layer=0,1,2`) sets that config key,
like `--config.KEY=VALUE`; any other axis is appended to the config's ARGS
(`configs/avmnist.py:clean` with `fusion=late seed=0` trains
`configs/avmnist.py:clean,fusion=late,seed=0`). Commas and spaces inside
brackets or quotes belong to the value: `config.model.head_hidden=(100,),(64,32)`.
`--config.KEY=VALUE` overrides apply to every point.

Every point's config is built and checked before anything starts, so that a
bad axis, key or value stops the whole sweep with one `error: ...` line and
exit status 2, as do a malformed --grid and a point directory that holds a run
of another config (`mmjax.rundir.check_resume`: keys that change the model,
the data or the optimisation; a larger total_steps extends a point).

Each point is an ordinary `python -m mmjax.train` run in DIR/<point>, named
from its grid values (`fusion=late,seed=0`; `config.` dropped from key axes),
with its output appended to DIR/<point>.log (one `=== ... attempt N` header
per attempt). Points run one at a time, or N at once with --parallel N.
The sweep records its attempts in DIR/<point>/sweep.json (time, exit status,
error, machine).

Skip and resume: a point is finished when its metrics.jsonl has the final row
(`wall_time_s` at step == total_steps) and its checkpoint of that step exists;
a finished point is skipped without starting a process. Every other point is
run again, which resumes an interrupted or failed point from its latest
checkpoint. A failed point (non-zero exit) is recorded with its error (its
last `error: ...` line, else its last line of output) and the others go on.
Ctrl-C (or SIGTERM) interrupts the running points, which keep their
checkpoints, and writes the results so far (exit status 130).

Outputs: DIR/results.json (a list of rows; `mmjax.results.load_results(DIR)`
reads it, and `mmjax.results.metric(row, "classification/accuracy")` picks an
eval metric) and
DIR/results.csv (the columns are the union over rows), rewritten whenever a
point ends. One row per point: the grid values (one column per axis, int,
float or str), name, status ("ok", "failed" or "pending"), error, attempts,
steps (the last logged step), total_steps, batch_size, train/loss at the last
logged step, the last value of every `eval/<dataset>/<evaluator>/<metric>`,
num_params, train_flops_per_example, examples_per_sec (the mean over logged
intervals except each process's first), wall_time_s (the sweep's clock,
summed over attempts) and machine (CPU model and cores, or accelerator count
and kind).

Exit status: 0 when every point is ok, 1 when any failed, 2 for bad input.
With --parallel > 1 the runs set XLA_PYTHON_CLIENT_PREALLOCATE=false (unless
set), so that several share one accelerator's memory.

Launchers (--launcher): `subprocess` (the default) is all of the above: each
point a child process of the sweep. `local` and `slurm` run each point as a
submitit job (`pip install -e ".[cluster]"`; submitit is imported only for
them): `local` with submitit's LocalExecutor on this machine (--parallel N
at a time), `slurm` with its SlurmExecutor, all the points to run as one
Slurm job array. A job runs the point's same `python -m mmjax.train` command
(in the sweep's directory, with the job's environment), appends its output to
DIR/<point>.log after a `=== ... sweep attempt N (slurm job 123_4): ...`
header and records the attempt in DIR/<point>/sweep.json (with its job, and
the machine the job ran on); submitit's own log of a job (its start, a
traceback of the job itself) is DIR/submitit/<job id>/<job id>_0_log.out.
Skip-finished, resume and results are as above. The flags:

  --time T               each job's time limit: minutes or [D-]HH:MM:SS
                         (local: none without it)
  --partition P, --gpus_per_task N (or --gpus_per_node N), --cpus_per_task N,
  --nodes N, --tasks_per_node N
                         the sbatch options (slurm); with several tasks every
                         task runs the same command (multi-host runs), task 0
                         writes the log and the attempt, task R its output to
                         DIR/<point>.rankR.log
  --slurm_array_parallelism N   how many points run at once (the array's %N)
  --slurm_extra KEY[=VALUE]     any other sbatch option (account=abc,
                                qos=high, mem=64G, constraint=a100);
                                repeatable
  --slurm_setup CMD      a shell line the batch script runs first (module
                         load ...); repeatable
  --no_wait              submit and return (slurm)

Time limits and preemption: the batch script has `--requeue` and
`--signal=USR2@90`. 90 s before --time the job asks its training to stop
(SIGTERM: mmjax.train saves the step it is in and exits with 143), records
the attempt as interrupted and requeues itself (`scontrol requeue`, up to 3
times); the requeued job runs the same command, which resumes from
DIR/<point>/checkpoints. SIGTERM to the job (scancel, preemption) stops the
training the same way; a job that Slurm requeues on preemption resumes too.

Waiting: by default the sweep waits for its jobs and rewrites the results as
each ends (for slurm it asks sacct, at most every 10 minutes). With
--no_wait it submits and returns (exit status 0); run the same command
again to collect: finished points are skipped, a point whose job is still
queued or running (DIR/<point>/sweep_job.json, asked of sacct) is waited for
(or, with --no_wait, left alone) and never submitted twice, and a point whose
job ended unfinished is submitted again, resuming. A job that ended without
recording its attempt (killed, or failed before its training started) is
recorded by the sweep as failed, with sacct's state (cancelled: interrupted).
Results say "pending" for a point while a job of it is queued or running.
Ctrl-C: local jobs stop as subprocess runs do (checkpoints kept, exit status
130); Slurm jobs go on (the sweep says which to scancel) and the same
command later collects them.
"""

import csv
import dataclasses
import datetime
import hashlib
import itertools
import json
import os
import pathlib
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import jax

from mmjax import cli, rundir
from mmjax.results import (is_finished, last_value, read_jsonl,
                           write_atomically)
from mmjax.errors import UsageError

USAGE = ("usage: python -m mmjax.sweep --config configs/X.py[:ARGS] "
         "--grid \"NAME=V1,V2 ...\" --workdir DIR [--parallel N] "
         "[--launcher subprocess|local|slurm [--time T] [--partition P] "
         "[--gpus_per_task N] ... [--no_wait]] [--config.KEY=VALUE ...]")

# results.csv column order around the axes and the sorted eval metrics.
LEADING = ("name", "status", "error", "attempts", "steps", "total_steps",
           "batch_size", "train/loss")
TRAILING = ("num_params", "train_flops_per_example", "examples_per_sec",
            "wall_time_s", "machine")
INTERRUPTED = cli.INTERRUPTED  # exit status after Ctrl-C
PREEMPTED = cli.PREEMPTED  # mmjax.train's exit status after SIGTERM


# ------------------------------------------------------------------- grid ---


@dataclasses.dataclass(frozen=True)
class Axis:
  """One grid axis: `name` as written (`fusion`, `config.batch_size`)."""
  name: str
  values: tuple[str, ...]

  @property
  def key(self) -> str | None:
    """The config key of a `config.KEY` axis, else None (an ARGS axis)."""
    return self.name[len("config."):] if self.is_config else None

  @property
  def is_config(self) -> bool:
    return self.name.startswith("config.")


@dataclasses.dataclass
class Point:
  """One grid point: its values (axis name -> text) and directory name."""
  values: dict[str, str]
  name: str
  config: object = None  # the locked ConfigDict, once built


def split_top_level(text: str, separators: str) -> list[str]:
  """Splits at `separators` outside brackets and quotes; keeps empty parts."""
  parts, current, closing, quote = [], [], [], None
  pairs = {"(": ")", "[": "]", "{": "}"}
  for char in text:
    if quote:
      quote = None if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in pairs:
      closing.append(pairs[char])
    elif char in ")]}":
      if not closing or closing.pop() != char:
        raise UsageError(f"--grid: unbalanced '{char}' in '{text}'")
    elif char in separators and not closing:
      parts.append("".join(current))
      current = []
      continue
    current.append(char)
  if quote or closing:
    raise UsageError(f"--grid: unclosed {quote or closing[-1]!r} in '{text}'")
  parts.append("".join(current))
  return parts


def parse_grid(text: str) -> list[Axis]:
  """ "fusion=late,concat config.batch_size=64,128" -> [Axis, Axis]."""
  axes = []
  for item in filter(None, split_top_level(text.strip(), " \t\n")):
    name, eq, values = item.partition("=")
    if not eq or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name):
      raise UsageError(f"--grid: '{item}' is not NAME=V1,V2,... (NAME a word, "
                       "or config.KEY for a config key)")
    if name == "config":
      raise UsageError(f"--grid: '{item}' names no config key: config.KEY=...")
    values = tuple(v.strip() for v in split_top_level(values, ","))
    if not all(values):
      raise UsageError(f"--grid axis '{name}' has an empty value: '{item}'")
    if len(set(values)) != len(values):
      raise UsageError(f"--grid axis '{name}' repeats a value: '{item}'")
    if not name.startswith("config.") and any("," in v for v in values):
      raise UsageError(f"--grid axis '{name}': a config ARGS value cannot "
                       "hold a comma")
    if name in (axis.name for axis in axes):
      raise UsageError(f"--grid names axis '{name}' twice")
    axes.append(Axis(name, values))
  if not axes:
    raise UsageError(f"--grid needs at least one axis NAME=V1,V2,...; {USAGE}")
  return axes


def typed(text: str) -> int | float | str:
  """A grid value as a results column value: int, float or the text."""
  if re.fullmatch(r"[-+]?\d+", text):
    return int(text)
  if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
    return float(text)
  return text


def point_name(values: dict[str, str]) -> str:
  """{"fusion": "late", "config.batch_size": "64"} ->
  "fusion=late,batch_size=64": readable and filesystem-safe (characters
  other than letters, digits and `._+-` become `_`; over 200 characters, a
  hash of the values ends the name)."""
  parts = []
  for name, value in values.items():
    value = re.sub(r"[^\w.+-]+", "_", value, flags=re.ASCII).strip("_")
    parts.append(f"{name.removeprefix('config.')}={value}")
  name = ",".join(parts)
  if len(name) > 200:
    digest = hashlib.sha1(json.dumps(values).encode()).hexdigest()[:10]
    name = f"{name[:180]}~{digest}"
  return name


def grid_points(axes: Sequence[Axis]) -> list[Point]:
  """The product of the axes, first axis slowest; names must be distinct."""
  points, seen = [], {}
  for combo in itertools.product(*(axis.values for axis in axes)):
    values = {axis.name: value for axis, value in zip(axes, combo)}
    point = Point(values, point_name(values))
    if point.name in seen:
      raise UsageError(f"--grid: points {seen[point.name]} and {values} "
                       f"would share the directory '{point.name}'")
    seen[point.name] = values
    points.append(point)
  return points


# ---------------------------------------------------------- command line ---


@dataclasses.dataclass
class Sweep:
  """The parsed command line."""
  spec: str  # configs/X.py[:ARGS]
  axes: list[Axis]
  workdir: pathlib.Path
  parallel: int = 1
  overrides: list[str] = dataclasses.field(default_factory=list)  # KEY=VALUE
  launcher: str = "subprocess"  # "subprocess", "local" or "slurm"
  time_s: int | None = None  # --time: each job's time limit
  wait: bool = True  # False: --no_wait (slurm: submit and return)
  slurm: dict = dataclasses.field(default_factory=dict)  # SlurmExecutor's

  def point_dir(self, point: Point) -> pathlib.Path:
    return self.workdir / point.name

  def point_argv(self, point: Point) -> list[str]:
    """`mmjax.train`'s arguments for `point`."""
    path, _, args = self.spec.partition(":")
    args = ",".join(filter(None, [args] + [
        f"{name}={value}" for name, value in point.values.items()
        if not name.startswith("config.")]))
    keys = [f"--{name}={value}" for name, value in point.values.items()
            if name.startswith("config.")]
    return ["--config", f"{path}:{args}" if args else path,
            "--workdir", str(self.point_dir(point)),
            *(f"--config.{o}" for o in self.overrides), *keys]


LAUNCHERS = ("subprocess", "local", "slurm")
# Flags of --launcher slurm: flag -> SlurmExecutor parameter (positive ints
# but --partition).
SLURM_FLAGS = {"partition": "partition", "gpus_per_task": "gpus_per_task",
               "gpus_per_node": "gpus_per_node",
               "cpus_per_task": "cpus_per_task", "nodes": "nodes",
               "tasks_per_node": "ntasks_per_node",
               "slurm_array_parallelism": "array_parallelism"}
REPEATED = ("--slurm_extra", "--slurm_setup")  # flags that may repeat
SWITCHES = ("--no_wait",)  # flags without a value
CLUSTER_INSTALL = 'pip install -e ".[cluster]"'

PROGRAM = cli.Program(
    "sweep", USAGE, {
        "--config": cli.CONFIG_FLAGS["--config"],
        "--grid": "the grid: space-separated axes NAME=V1,V2,... (NAME an "
                  "ARGS key of the config, or config.KEY)",
        "--workdir": "the sweep's directory: one run directory per point, "
                     "results.csv, results.json",
        "--parallel": "how many points run at once (1; subprocess and local "
                      "launchers)",
        "--launcher": "how points run: subprocess (the default: child "
                      "processes of the sweep), local (submitit's "
                      "LocalExecutor) or slurm (submitit's SlurmExecutor, "
                      "one Slurm job array)",
        "--time": "each job's time limit, minutes or [D-]HH:MM:SS (local, "
                  "slurm); before it the job checkpoints and is requeued",
        "--partition": "slurm: the partition",
        "--gpus_per_task": "slurm: GPUs per task",
        "--gpus_per_node": "slurm: GPUs per node (instead of --gpus_per_task)",
        "--cpus_per_task": "slurm: CPUs per task",
        "--nodes": "slurm: nodes per point (1; every task runs the same "
                   "mmjax.train command)",
        "--tasks_per_node": "slurm: tasks per node (1)",
        "--slurm_array_parallelism": "slurm: how many points run at once "
                                     "(the array's %N; 256)",
        "--slurm_extra": "slurm: an extra sbatch option KEY=VALUE (or KEY), "
                         "e.g. account=abc; repeatable",
        "--slurm_setup": "slurm: a shell command the batch script runs "
                         "first, e.g. 'module load cuda'; repeatable",
        "--no_wait": "slurm: submit and return; the same command again "
                     "collects the results (no value)"},
    required=("--config", "--grid", "--workdir"))


def take_repeated(argv: Sequence[str]) -> tuple[list[str], dict[str, list]]:
  """Takes the REPEATED flags (each with its value) and the SWITCHES out of
  argv: (the rest, {"slurm_extra": [...], "slurm_setup": [...],
  "no_wait": [True]})."""
  rest, taken, args = [], {}, list(argv)
  while args:
    arg = args.pop(0)
    name, eq, value = arg.partition("=")
    if name in SWITCHES:
      if eq:
        raise UsageError(f"{name} takes no value, got '{arg}'")
      taken.setdefault(name[2:], []).append(True)
    elif name in REPEATED:
      if not eq:
        if not args:
          raise UsageError(f"{name} needs a value; {USAGE}")
        value = args.pop(0)
      taken.setdefault(name[2:], []).append(value)
    else:
      rest.append(arg)
  return rest, taken


def parse_time(text: str) -> int:
  """A time limit as Slurm writes it -> seconds: `90` (minutes), `MM:SS`,
  `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`; UsageError if malformed."""
  match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?",
                       text.strip())
  if not match:
    raise UsageError(f"--time must be minutes or [D-]HH:MM:SS, got '{text}'")
  days, first, second, third = match.groups()
  numbers = [int(n) for n in (first, second, third) if n is not None]
  if days is not None:  # D-HH[:MM[:SS]]
    hours, minutes, seconds = (numbers + [0, 0])[:3]
    seconds += 60 * (minutes + 60 * (hours + 24 * int(days)))
  elif len(numbers) == 1:  # minutes
    seconds = 60 * numbers[0]
  elif len(numbers) == 2:  # MM:SS
    seconds = 60 * numbers[0] + numbers[1]
  else:  # HH:MM:SS
    seconds = 3600 * numbers[0] + 60 * numbers[1] + numbers[2]
  if seconds <= 0:
    raise UsageError(f"--time must be positive, got '{text}'")
  return seconds


def positive_int(options: dict, name: str) -> int:
  try:
    value = int(options[name])
  except ValueError:
    value = 0
  if value < 1:
    raise UsageError(f"--{name} must be a positive integer, got "
                     f"'{options[name]}'")
  return value


def import_submitit():
  """submitit, imported only for --launcher local or slurm."""
  try:
    import submitit  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UsageError("--launcher local and slurm need submitit: "
                     f"{CLUSTER_INSTALL}") from None
  return submitit


def slurm_parameters(options: dict, taken: dict, time_s: int | None) -> dict:
  """The SlurmExecutor parameters from the slurm flags."""
  params = {}
  for flag, key in SLURM_FLAGS.items():
    if flag in options:
      params[key] = (options[flag] if flag == "partition"
                     else positive_int(options, flag))
  if "gpus_per_task" in params and "gpus_per_node" in params:
    raise UsageError("give --gpus_per_task or --gpus_per_node, not both")
  if not params.get("partition", "x").strip():
    raise UsageError("--partition needs a partition name")
  if time_s is not None:
    params["time"] = -(-time_s // 60)  # whole minutes, rounded up
  extra = {"requeue": True}  # the job requeues itself before its time limit
  for item in taken.get("slurm_extra", []):
    key, eq, value = item.partition("=")
    key = key.strip().removeprefix("--")
    if not re.fullmatch(r"[A-Za-z][\w-]*", key):
      raise UsageError(f"--slurm_extra must be KEY=VALUE or KEY (an sbatch "
                       f"option), got '{item}'")
    extra[key.replace("_", "-")] = value if eq else True
  params["additional_parameters"] = extra
  if taken.get("slurm_setup"):
    params["setup"] = list(taken["slurm_setup"])
  return params


def parse_command_line(argv: Sequence[str]) -> Sweep:
  """argv (without the program) -> Sweep; UsageError on bad input."""
  argv, taken = take_repeated(argv)
  options, overrides = cli.parse_flags(argv, PROGRAM)
  try:
    parallel = int(options.get("parallel", "1"))
  except ValueError:
    parallel = 0
  if parallel < 1:
    raise UsageError(f"--parallel must be a positive integer, got "
                     f"'{options['parallel']}'")
  launcher = options.get("launcher", "subprocess")
  if launcher not in LAUNCHERS:
    raise UsageError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got "
                     f"'{launcher}'")
  slurm_only = [f"--{f}" for f in SLURM_FLAGS if f in options] + [
      f"--{f}" for f in ("slurm_extra", "slurm_setup", "no_wait")
      if f in taken]
  if launcher != "slurm" and slurm_only:
    raise UsageError(f"{slurm_only[0]} needs --launcher slurm")
  if launcher == "subprocess" and "time" in options:
    raise UsageError("--time needs --launcher local or slurm")
  if launcher == "slurm" and "parallel" in options:
    raise UsageError("--parallel is for the subprocess and local launchers; "
                     "with slurm, --slurm_array_parallelism N")
  time_s = parse_time(options["time"]) if "time" in options else None
  slurm = (slurm_parameters(options, taken, time_s) if launcher == "slurm"
           else {})
  axes = parse_grid(options["grid"])
  keys = {o.partition("=")[0] for o in overrides}
  for axis in axes:
    if axis.key in keys:
      raise UsageError(f"config key '{axis.key}' is both a grid axis and a "
                       f"--config.{axis.key} override")
  if launcher != "subprocess":
    import_submitit()
  if launcher == "slurm" and shutil.which("srun") is None:
    raise UsageError("--launcher slurm: no srun on PATH; run the sweep where "
                     "Slurm's commands are (a login node)")
  return Sweep(options["config"], axes, pathlib.Path(options["workdir"]),
               parallel, overrides, launcher, time_s, "no_wait" not in taken,
               slurm)


# ------------------------------------------------------------- checking ---


def build_config(sweep: Sweep, point: Point):
  """The point's locked config, exactly as `mmjax.train` will build it."""
  try:
    return cli.parse_command_line(sweep.point_argv(point), "train")[0]
  except UsageError:
    raise
  except Exception as e:  # a config file's own check, e.g. int("x")
    raise UsageError(f"{type(e).__name__}: {e}") from e


def blame(sweep: Sweep, point: Point, error: UsageError) -> str:
  """Where `error` comes from: "" (not the grid), one grid axis, or the
  point (a combination of values)."""
  def fails_alike(values):
    try:
      build_config(sweep, Point(values, point.name))
    except UsageError as e:
      return str(e) == str(error)
    return False

  if fails_alike({}):
    return ""
  for name, value in point.values.items():
    if fails_alike({name: value}):
      return f"grid axis '{name}={value}': "
  return f"grid point '{point.name}': "


def build_configs(sweep: Sweep, points: Sequence[Point]):
  """Builds every point's config; the first bad one raises UsageError."""
  for point in points:
    try:
      point.config = build_config(sweep, point)
    except UsageError as e:
      raise UsageError(f"{blame(sweep, point, e)}{e}") from None


def plan(sweep: Sweep) -> list[Point]:
  """The points, each with its checked config; UsageError if any is bad."""
  points = grid_points(sweep.axes)
  build_configs(sweep, points)
  for point in points:
    rundir.check_resume(sweep.point_dir(point), point.config.to_dict())
  return points


# ---------------------------------------------------------------- results ---


def attempts_of(run_dir: pathlib.Path) -> list[dict]:
  path = run_dir / "sweep.json"
  return json.loads(path.read_text())["attempts"] if path.exists() else []


def record_attempt(run_dir: pathlib.Path, attempt: dict):
  """Appends `attempt` to run_dir/sweep.json."""
  run_dir.mkdir(parents=True, exist_ok=True)
  attempts = attempts_of(run_dir) + [attempt]
  write_atomically(run_dir / "sweep.json",
                   json.dumps({"attempts": attempts}, indent=1) + "\n")


def result_row(sweep: Sweep, point: Point) -> dict:
  """The point's results row, read from its directory."""
  run_dir = sweep.point_dir(point)
  rows = read_jsonl(run_dir / "metrics.jsonl")
  attempts = attempts_of(run_dir)
  total_steps = point.config.total_steps
  if is_finished(run_dir, total_steps):
    status, error = "ok", ""
  elif submitted_since(run_dir, attempts):
    status, error = "pending", ""  # a job of it is queued or running
  elif attempts and attempts[-1]["outcome"] == "failed":
    status, error = "failed", attempts[-1]["error"]
  else:
    status, error = "pending", ""
  speeds = [r["examples_per_sec"] for r in rows
            if "examples_per_sec" in r and "time_to_first_step_s" not in r]
  row = {name: typed(value) for name, value in point.values.items()}
  row.update({
      "name": point.name, "status": status, "error": error,
      "attempts": len(attempts), "steps": last_value(rows, "step"),
      "total_steps": total_steps, "batch_size": point.config.batch_size,
      "train/loss": last_value(rows, "train/loss")})
  evals = sorted({k for r in rows for k in r if k.startswith("eval/")})
  row.update({k: last_value(rows, k) for k in evals})
  row.update({
      "num_params": last_value(rows, "num_params"),
      "train_flops_per_example": last_value(rows, "train_flops_per_example"),
      "examples_per_sec": sum(speeds) / len(speeds) if speeds else None,
      "wall_time_s": (sum(a["wall_time_s"] for a in attempts)
                      if attempts else None),
      "machine": attempts[-1]["machine"] if attempts else None})
  return row


def submitted_since(run_dir: pathlib.Path, attempts: Sequence[dict]) -> bool:
  """Whether a job was submitted for the point after its last attempt."""
  record = read_json(run_dir / JOB_FILE)
  return bool(record) and record.get("attempts_before", 0) >= len(attempts)


def columns(rows: Sequence[dict], axes: Sequence[Axis]) -> list[str]:
  """The union of the rows' keys: axes, LEADING, the rest sorted, TRAILING."""
  keys = {k for row in rows for k in row}
  fixed = [a.name for a in axes] + list(LEADING)
  rest = sorted(keys - set(fixed) - set(TRAILING))
  return [k for k in fixed + rest + list(TRAILING) if k in keys]


def write_results(sweep: Sweep, points: Sequence[Point]) -> list[dict]:
  """Writes DIR/results.json and DIR/results.csv; returns the rows."""
  rows = [result_row(sweep, p) for p in points]
  sweep.workdir.mkdir(parents=True, exist_ok=True)
  write_atomically(sweep.workdir / "results.json",
                   json.dumps(rows, indent=1) + "\n")
  tmp = sweep.workdir / "results.csv.tmp"
  with tmp.open("w", newline="") as f:
    writer = csv.DictWriter(f, columns(rows, sweep.axes), restval="")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()}
                     for row in rows)
  os.replace(tmp, sweep.workdir / "results.csv")
  return rows


# -------------------------------------------------------------- machines ---


def machine() -> str:
  """The processor (model name, cores) or the accelerator this runs on."""
  device = jax.devices()[0]
  if device.platform != "cpu":
    return f"{jax.device_count()} x {device.device_kind}"
  model = platform.processor() or platform.machine()
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  if cpuinfo.exists():
    for line in cpuinfo.read_text().splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  return f"{model}, {os.cpu_count()} cores, CPU only"


class MachineProbe:
  """`machine()` as the runs see it, asked of a child process (so that this
  one never takes an accelerator, or its memory, from the runs), started at
  once and read when first needed."""

  def __init__(self, env: dict):
    self._process = subprocess.Popen(
        [sys.executable, "-c",
         "from mmjax.sweep import machine; print(machine())"],
        env=dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    self._name = None

  def name(self) -> str:
    if self._name is None:
      try:
        output, _ = self._process.communicate(timeout=600)
      except subprocess.TimeoutExpired:
        self._process.kill()
        output, _ = self._process.communicate()
      lines = output.strip().splitlines()
      self._name = (lines[-1] if self._process.returncode == 0 and lines
                    else "unknown")
    return self._name


# ---------------------------------------------------------------- running ---


@dataclasses.dataclass
class Running:
  """A point's training process."""
  point: Point
  process: subprocess.Popen
  log: pathlib.Path
  log_offset: int  # where this attempt's output starts in the log
  started: float
  interrupted: bool = False


def log_path(sweep: Sweep, point: Point) -> pathlib.Path:
  return sweep.workdir / f"{point.name}.log"


def start(sweep: Sweep, point: Point, env: dict) -> Running:
  """Starts `python -m mmjax.train` for `point`, appending to its log.

  The process gets its own session, so that Ctrl-C on a terminal reaches
  only the sweep, which passes it on once (`stop`).
  """
  command = [sys.executable, "-m", "mmjax.train", *sweep.point_argv(point)]
  path = log_path(sweep, point)
  number = len(attempts_of(sweep.point_dir(point))) + 1
  with path.open("a") as log:
    log.write(f"=== {now()} sweep attempt {number}: {shlex.join(command)}\n")
    log.flush()
    offset = log.tell()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
  return Running(point, process, path, offset, time.time())


def now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def error_line(text: str, returncode: int) -> str:
  """A failed run's error: its last `error: ...` line, else its last line of
  output (a traceback's exception), with a signal's name if one killed it."""
  lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
  errors = [line for line in lines if line.startswith("error: ")]
  line = (errors or lines or [""])[-1][:500]
  if returncode < 0:
    name = signal.Signals(-returncode).name
    return f"killed by {name}" + (f" after: {line}" if line else "")
  return line or f"exit status {returncode}"


def finish(sweep: Sweep, run: Running, probe: MachineProbe) -> dict:
  """Records the ended attempt in sweep.json and returns it; its outcome is
  "ok", "failed" or "interrupted"."""
  returncode = run.process.returncode
  with run.log.open(errors="replace") as log:
    log.seek(run.log_offset)
    output = log.read()
  if returncode == 0:
    outcome, error = "ok", ""
  elif run.interrupted:
    outcome, error = "interrupted", ""
  else:
    outcome, error = "failed", error_line(output, returncode)
  attempt = {
      "started": datetime.datetime.fromtimestamp(run.started).isoformat(
          timespec="seconds"),
      "wall_time_s": time.time() - run.started, "exit_status": returncode,
      "outcome": outcome, "error": error, "machine": probe.name()}
  record_attempt(sweep.point_dir(run.point), attempt)
  return attempt


def stop(running: Sequence[Running], timeout: float = 120.0):
  """Interrupts the processes (SIGINT, as Ctrl-C: each writes what it has
  and waits for its checkpoint writes) and waits; kills what outlives
  `timeout` seconds or a second Ctrl-C."""
  for run in running:
    run.interrupted = True
    signal_group(run.process, signal.SIGINT)
  deadline = time.time() + timeout
  try:
    for run in running:
      try:
        run.process.wait(max(0.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        pass
  except KeyboardInterrupt:
    pass
  for run in running:
    if run.process.poll() is None:
      signal_group(run.process, signal.SIGKILL)
      run.process.wait()


def signal_group(process: subprocess.Popen, signum: int):
  """Sends `signum` to the process's group (its session, from `start`)."""
  if process.poll() is None:
    try:
      os.killpg(process.pid, signum)
    except ProcessLookupError:
      pass


def say(text: str):
  print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def run_points(sweep: Sweep, points: Sequence[Point], todo: Sequence[Point]):
  """Runs `todo`, `sweep.parallel` at a time, rewriting the results as each
  ends; KeyboardInterrupt stops the running ones and propagates."""
  env = dict(os.environ)
  if sweep.parallel > 1:
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  probe = MachineProbe(env)
  queue, running = list(todo), []
  index = {p.name: i + 1 for i, p in enumerate(points)}
  try:
    while queue or running:
      while queue and len(running) < sweep.parallel:
        point = queue.pop(0)
        running.append(start(sweep, point, env))
        say(f"{index[point.name]}/{len(points)} {point.name}: started, log "
            f"{log_path(sweep, point)}")
      time.sleep(0.1)
      for run in [r for r in running if r.process.poll() is not None]:
        running.remove(run)
        attempt = finish(sweep, run, probe)
        say(f"{index[run.point.name]}/{len(points)} {run.point.name}: "
            f"{attempt['outcome']} in {attempt['wall_time_s']:.0f}s" +
            (f": {attempt['error']}" if attempt["error"] else ""))
        write_results(sweep, points)
  except KeyboardInterrupt:
    say(f"interrupted; stopping {len(running)} run(s)")
    stop(running)
    for run in running:
      finish(sweep, run, probe)
    raise


# ------------------------------------------------------ submitit launchers ---

# The job a point's submission is (DIR/<point>/sweep_job.json, written by the
# sweep) and the attempt a job is running (DIR/<point>/sweep_running.json,
# written by the job as it starts, removed once it has recorded its attempt).
JOB_FILE, RUNNING_FILE = "sweep_job.json", "sweep_running.json"
FOREVER_MIN = 60 * 24 * 365  # LocalExecutor's time limit without --time
STOP_TIMEOUT_S = 600.0  # how long a stopping job waits for its training
# sacct's states of a Slurm job that will not run again.
SLURM_ENDED = ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED",
               "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "REVOKED",
               "TIMEOUT", "SPECIAL_EXIT")
UNKNOWN_GRACE_S = 600  # sacct may not list a job yet this long after sbatch


def read_json(path: pathlib.Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


class TrainJob:
  """A submitit job: runs `python -m mmjax.train` for one point, exactly as
  the subprocess launcher does (output appended to DIR/<point>.log after an
  `=== ... sweep attempt N` header, the attempt recorded in sweep.json).

  SIGTERM or SIGINT (scancel, a local job stopped) passes SIGTERM on to the
  training, which saves its step and exits with 143; the attempt is
  "interrupted". submitit's time-limit signal (USR2, `signal_delay_s` before
  --time) does the same, then requeues the job (`checkpoint`), which runs the
  same command again and so resumes from DIR/<point>/checkpoints. A failed
  or interrupted training makes the job fail (so that sacct says FAILED).
  With several tasks (--nodes, --tasks_per_node) every task runs the same
  command; task 0 writes the log and the attempt, task R appends its output
  to DIR/<point>.rankR.log.
  """

  def __init__(self, args: Sequence[str], run_dir: str, log: str, cwd: str,
               env: dict | None = None, launcher: str = "local"):
    self.args = list(args)  # python's: ["-m", "mmjax.train", ...]
    self.run_dir, self.log, self.cwd = run_dir, log, cwd
    self.env = env  # None: the job's own environment
    self.launcher = launcher
    self._reset()

  def _reset(self):
    self._process = self._waiter = self._attempt = None
    self._stopping = False

  def __getstate__(self):
    state = dict(self.__dict__)
    for key in ("_process", "_waiter", "_attempt", "_stopping", "_header",
                "_offset", "_started", "_probe", "_job_id"):
      state.pop(key, None)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._reset()

  def __repr__(self):
    return f"TrainJob({shlex.join(['python', *self.args])})"

  def fresh(self) -> "TrainJob":
    return TrainJob(self.args, self.run_dir, self.log, self.cwd, self.env,
                    self.launcher)

  @staticmethod
  def _job_environment() -> tuple[str, int]:
    """(job id, global rank) of the running submitit job, else ("?", 0)."""
    try:
      import submitit  # pylint: disable=import-outside-toplevel
      environment = submitit.JobEnvironment()
      return str(environment.job_id), environment.global_rank
    except Exception:  # pylint: disable=broad-except
      return "?", 0

  def __call__(self) -> dict:
    self._job_id, rank = self._job_environment()
    env = dict(os.environ if self.env is None else self.env)
    log = pathlib.Path(self.log)
    if rank:
      log = log.with_name(f"{log.name.removesuffix('.log')}.rank{rank}.log")
    run_dir = pathlib.Path(self.run_dir)
    command = [sys.executable, *self.args]
    number = len(attempts_of(run_dir)) + 1
    self._started = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
      f.write(f"=== {now()} sweep attempt {number} ({self.launcher} job "
              f"{self._job_id}): {shlex.join(command)}\n")
      f.flush()
      self._offset = f.tell()
      if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(run_dir / RUNNING_FILE, json.dumps({
            "job": self._job_id, "launcher": self.launcher,
            "started": self._started, "log_offset": self._offset,
            "host": platform.node()}) + "\n")
        self._probe = MachineProbe(env)
      # Its own session: a terminal's Ctrl-C reaches the job, which passes
      # SIGTERM on (the training then saves the step it is in).
      self._process = subprocess.Popen(
          command, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=f,
          stderr=subprocess.STDOUT, start_new_session=True)
    # A thread waits for the training, so that signal handlers (which run
    # in this thread) never contend for Popen's lock.
    self._waiter = threading.Thread(target=self._process.wait, daemon=True)
    self._waiter.start()
    previous = {s: signal.signal(s, self._stop_signal)
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      while self._waiter.is_alive():
        self._waiter.join(0.5)
    except BaseException:  # submitit's requeue exits from a signal handler
      self._stop()
      raise
    finally:
      for signum, handler in previous.items():
        signal.signal(signum, handler)
      if rank == 0:
        self._finish()
    returncode = self._process.returncode
    if rank:
      if returncode:
        raise RuntimeError(f"task {rank}: mmjax.train exit status "
                           f"{returncode}; its output: {log}")
      return {}
    attempt = self._attempt
    if attempt["outcome"] != "ok":
      raise RuntimeError(f"mmjax.train {attempt['outcome']} (exit status "
                         f"{returncode}): {attempt['error']}; its output: "
                         f"{self.log}")
    return attempt

  def _stop_signal(self, signum, frame):  # pylint: disable=unused-argument
    self._stopping = True
    if self._process is not None:
      signal_group(self._process, signal.SIGTERM)

  def _stop(self, timeout: float = STOP_TIMEOUT_S):
    """Asks the training to save and stop (SIGTERM); waits for it."""
    if self._process is None:
      return
    self._stopping = True
    if self._process.returncode is None:
      signal_group(self._process, signal.SIGTERM)
    deadline = time.time() + timeout
    while self._process.returncode is None and time.time() < deadline:
      time.sleep(0.2)
    if self._process.returncode is None:
      signal_group(self._process, signal.SIGKILL)
      while self._process.returncode is None:
        time.sleep(0.2)

  def _finish(self):
    """Records this attempt (once): sweep.json, then the running file goes."""
    if self._attempt is not None or self._process is None or (
        self._process.returncode is None):
      return
    returncode = self._process.returncode
    with open(self.log, errors="replace") as f:
      f.seek(self._offset)
      output = f.read()
    if returncode == 0:
      outcome, error = "ok", ""
    elif self._stopping or returncode in (INTERRUPTED, PREEMPTED):
      outcome, error = "interrupted", ""
    else:
      outcome, error = "failed", error_line(output, returncode)
    self._attempt = {
        "started": datetime.datetime.fromtimestamp(self._started).isoformat(
            timespec="seconds"),
        "wall_time_s": time.time() - self._started,
        "exit_status": returncode, "outcome": outcome, "error": error,
        "machine": self._probe.name(),
        "job": f"{self.launcher} {self._job_id}"}
    run_dir = pathlib.Path(self.run_dir)
    record_attempt(run_dir, self._attempt)
    (run_dir / RUNNING_FILE).unlink(missing_ok=True)

  def checkpoint(self, *args, **kwargs):
    """submitit's time-limit (or preemption) hook: stop the training, which
    saves a checkpoint, record the attempt; the same job then runs again."""
    del args, kwargs
    self._stop()
    self._finish()
    import submitit  # pylint: disable=import-outside-toplevel
    return submitit.helpers.DelayedSubmission(self.fresh())



def train_job(sweep: Sweep, point: Point, env: dict | None) -> TrainJob:
  return TrainJob(["-m", "mmjax.train", *sweep.point_argv(point)],
                  str(sweep.point_dir(point)), str(log_path(sweep, point)),
                  os.getcwd(), env, sweep.launcher)


def make_executor(sweep: Sweep):
  """submitit's executor for --launcher local or slurm; its logs and pickles
  go to DIR/submitit/<job id>/."""
  submitit = import_submitit()
  folder = sweep.workdir.resolve() / "submitit" / "%j"
  if sweep.launcher == "local":
    executor = submitit.LocalExecutor(folder)
    executor.update_parameters(
        timeout_min=sweep.time_s / 60 if sweep.time_s else FOREVER_MIN,
        stderr_to_stdout=True)
    return executor
  executor = submitit.SlurmExecutor(folder)
  executor.update_parameters(
      job_name=f"mmjax-sweep:{sweep.workdir.resolve().name}",
      stderr_to_stdout=True, **sweep.slurm)
  return executor


def job_tag(sweep: Sweep, job) -> str:
  return f"{sweep.launcher} {job.job_id}"


def submitted_jobs(sweep: Sweep, points: Sequence[Point]) -> dict:
  """{point name: its Slurm job} from earlier runs of the sweep, for the
  jobs that may still run (queued, running, requeued; one sacct call). The
  points whose job ended are settled (`settle`)."""
  if sweep.launcher != "slurm":
    return {}
  from submitit.slurm.slurm import SlurmJob  # pylint: disable=import-outside-toplevel
  found = {}
  for point in points:
    record = read_json(sweep.point_dir(point) / JOB_FILE)
    if record and record.get("launcher") == "slurm":
      found[point.name] = (point, record, SlurmJob(
          folder=record["folder"], job_id=record["job_id"]))
  if not found:
    return {}
  SlurmJob.watcher.update()  # all of them at once
  live = {}
  for name, (point, record, job) in found.items():
    state = (job.watcher.get_state(job.job_id, mode="cache") or "UNKNOWN"
             ).split()[0]
    if state in SLURM_ENDED or (
        state == "UNKNOWN" and
        time.time() - record["submitted"] > UNKNOWN_GRACE_S):
      settle(sweep, point, job, state)
    else:
      live[name] = job
  return live


def record_job(sweep: Sweep, point: Point, job):
  run_dir = sweep.point_dir(point)
  run_dir.mkdir(parents=True, exist_ok=True)
  write_atomically(run_dir / JOB_FILE, json.dumps({
      "launcher": sweep.launcher, "job_id": str(job.job_id),
      "folder": str(sweep.workdir.resolve() / "submitit" / "%j"),
      "submitted": time.time(),
      "attempts_before": len(attempts_of(run_dir))}) + "\n")


def settle(sweep: Sweep, point: Point, job, state: str = "",
           interrupted: bool = False) -> dict | None:
  """After `job` ended: records the attempt its job could not (killed, or
  never started the training) and returns the point's last attempt."""
  run_dir = sweep.point_dir(point)
  tag = job_tag(sweep, job)
  running = read_json(run_dir / RUNNING_FILE)
  attempts = attempts_of(run_dir)
  if running and running.get("job") == str(job.job_id):
    started, offset = running["started"], running["log_offset"]
  elif any(a.get("job") == tag for a in attempts):
    return attempts[-1]
  else:
    started, offset = None, None
  if not state:
    try:
      state = str(job.state)
    except Exception:  # pylint: disable=broad-except
      state = "UNKNOWN"
  output = ""
  if offset is not None:
    try:
      with log_path(sweep, point).open(errors="replace") as f:
        f.seek(offset)
        output = f.read()
    except OSError:
      pass
  if interrupted or state.startswith("CANCELLED"):
    outcome, error = "interrupted", ""
  else:
    outcome = "failed"
    where = (f"; its log: {sweep.workdir / 'submitit' / str(job.job_id)}")
    line = error_line(output, 1) if output.strip() else ""
    error = (f"{tag} ended ({state}) "
             f"{'during' if started else 'before'} the training"
             f"{': ' + line if line else ''}{where}")[:500]
  attempt = {
      "started": datetime.datetime.fromtimestamp(
          started or time.time()).isoformat(timespec="seconds"),
      "wall_time_s": time.time() - started if started else 0.0,
      "exit_status": None, "outcome": outcome, "error": error,
      "machine": running.get("host", "unknown") if running else "unknown",
      "job": tag}
  record_attempt(run_dir, attempt)
  (run_dir / RUNNING_FILE).unlink(missing_ok=True)
  return attempt


def run_jobs(sweep: Sweep, points: Sequence[Point], todo: Sequence[Point]
             ) -> bool:
  """Runs `todo` as submitit jobs; rewrites the results as each ends.
  Returns whether it waited for them all. KeyboardInterrupt: local jobs are
  stopped (they keep their checkpoints); Slurm jobs go on."""
  index = {p.name: i + 1 for i, p in enumerate(points)}
  jobs = submitted_jobs(sweep, todo)  # point name -> job
  for name, job in jobs.items():
    say(f"{index[name]}/{len(points)} {name}: already submitted as "
        f"{job_tag(sweep, job)}, not submitted again")
  queue = [p for p in todo if p.name not in jobs]
  executor = make_executor(sweep)
  env = None
  if sweep.launcher == "local":
    env = dict(os.environ)
    if sweep.parallel > 1:
      env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

  def submit(batch):
    if not batch:
      return
    if sweep.launcher == "slurm":
      with executor.batch():
        new = [executor.submit(train_job(sweep, p, env)) for p in batch]
    else:
      new = [executor.submit(train_job(sweep, p, env)) for p in batch]
    for point, job in zip(batch, new):
      record_job(sweep, point, job)
      jobs[point.name] = job
      say(f"{index[point.name]}/{len(points)} {point.name}: submitted as "
          f"{job_tag(sweep, job)}, log {log_path(sweep, point)}")

  limit = sweep.parallel if sweep.launcher == "local" else len(queue)
  submit([queue.pop(0) for _ in range(min(limit, len(queue)))])
  if not sweep.wait:
    return False
  try:
    wait_for_jobs(sweep, points, jobs, queue, submit, limit)
  finally:
    try:  # LocalExecutor's controller makes an empty DIR/submitit/%j
      (sweep.workdir / "submitit" / "%j").rmdir()
    except OSError:
      pass
  return True


def wait_for_jobs(sweep: Sweep, points: Sequence[Point], jobs: dict,
                  queue: list, submit, limit: int):
  """Waits for `jobs` (point name -> job) and submits the `queue` as they
  end, `limit` at a time; rewrites the results as each ends."""
  index = {p.name: i + 1 for i, p in enumerate(points)}
  by_name = {p.name: p for p in points}
  poll = 0.2 if sweep.launcher == "local" else 5.0
  try:
    while jobs or queue:
      time.sleep(poll)
      for name, job in list(jobs.items()):
        if not job.done():
          continue
        del jobs[name]
        attempt = settle(sweep, by_name[name], job)
        if attempt:
          say(f"{index[name]}/{len(points)} {name}: {attempt['outcome']} in "
              f"{attempt['wall_time_s']:.0f}s" +
              (f": {attempt['error']}" if attempt["error"] else ""))
        write_results(sweep, points)
      free = limit - len(jobs)
      submit([queue.pop(0) for _ in range(min(free, len(queue)))])
  except KeyboardInterrupt:
    if sweep.launcher == "slurm":
      ids = sorted({str(j.job_id).split("_")[0] for j in jobs.values()})
      say(f"interrupted; the Slurm jobs go on (scancel {' '.join(ids)} "
          "stops them)" if ids else "interrupted")
      raise
    say(f"interrupted; stopping {len(jobs)} job(s)")
    stop_local(jobs.values())
    for name, job in jobs.items():
      settle(sweep, by_name[name], job, interrupted=True)
    raise


def stop_local(jobs, timeout: float = 120.0):
  """Stops LocalExecutor jobs: SIGTERM to each job's controller, which passes
  it on to the job, and so to the training; kills what outlives `timeout`."""
  processes = [job._process for job in jobs  # pylint: disable=protected-access
               if getattr(job, "_process", None) is not None]
  for process in processes:
    if process.poll() is None:
      process.send_signal(signal.SIGTERM)
  deadline = time.time() + timeout
  try:
    for process in processes:
      try:
        process.wait(max(0.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        pass
  except KeyboardInterrupt:
    pass
  for process in processes:
    if process.poll() is None:
      process.kill()
      process.wait()


def run_sweep(sweep: Sweep, points: Sequence[Point]) -> int:
  """Runs the unfinished points; returns the exit status."""
  todo = []
  for i, point in enumerate(points):
    if is_finished(sweep.point_dir(point), point.config.total_steps):
      say(f"{i + 1}/{len(points)} {point.name}: finished, skipped")
    else:
      todo.append(point)
  write_results(sweep, points)
  try:
    if todo and sweep.launcher == "subprocess":
      run_points(sweep, points, todo)
    elif todo and not run_jobs(sweep, points, todo):
      write_results(sweep, points)
      say(f"submitted; run the same command again to collect the results "
          f"into {sweep.workdir / 'results.csv'}")
      return 0
  except KeyboardInterrupt:
    write_results(sweep, points)
    say(f"results so far in {sweep.workdir / 'results.csv'}; run the same "
        "command again to " +
        ("collect and resume" if sweep.launcher == "slurm" else "resume"))
    return INTERRUPTED
  rows = write_results(sweep, points)
  counts = {s: sum(r["status"] == s for r in rows)
            for s in ("ok", "failed", "pending")}
  say(", ".join(f"{n} {s}" for s, n in counts.items()) +
      f"; results in {sweep.workdir / 'results.csv'}")
  return 0 if counts["ok"] == len(rows) else 1


def _interrupt(signum, frame):
  raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
  def run(args):
    sweep = parse_command_line(args)
    points = plan(sweep)
    previous = {s: signal.signal(s, _interrupt)
                for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
      return run_sweep(sweep, points)
    finally:
      for signum, handler in previous.items():
        signal.signal(signum, handler)

  return cli.main(run, PROGRAM, argv)


if __name__ == "__main__":
  sys.exit(main())
