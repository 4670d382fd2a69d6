"""Runs a grid of training runs and tabulates them: `python -m mmjax.sweep`.

  python -m mmjax.sweep --config configs/X.py[:ARGS] --workdir DIR \
      --grid "fusion=late,concat,perceiver seed=0,1,2" [--parallel N] \
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
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import jax

from mmjax import cli, rundir
from mmjax.results import (is_finished, last_value, read_jsonl,
                           write_atomically)
from mmjax.errors import UsageError

USAGE = ("usage: python -m mmjax.sweep --config configs/X.py[:ARGS] "
         "--grid \"NAME=V1,V2 ...\" --workdir DIR [--parallel N] "
         "[--config.KEY=VALUE ...]")

# results.csv column order around the axes and the sorted eval metrics.
LEADING = ("name", "status", "error", "attempts", "steps", "total_steps",
           "batch_size", "train/loss")
TRAILING = ("num_params", "train_flops_per_example", "examples_per_sec",
            "wall_time_s", "machine")
INTERRUPTED = cli.INTERRUPTED  # exit status after Ctrl-C


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


PROGRAM = cli.Program(
    "sweep", USAGE, {
        "--config": cli.CONFIG_FLAGS["--config"],
        "--grid": "the grid: space-separated axes NAME=V1,V2,... (NAME an "
                  "ARGS key of the config, or config.KEY)",
        "--workdir": "the sweep's directory: one run directory per point, "
                     "results.csv, results.json",
        "--parallel": "how many points run at once (1)"},
    required=("--config", "--grid", "--workdir"))


def parse_command_line(argv: Sequence[str]) -> Sweep:
  """argv (without the program) -> Sweep; UsageError on bad input."""
  options, overrides = cli.parse_flags(argv, PROGRAM)
  try:
    parallel = int(options.get("parallel", "1"))
  except ValueError:
    parallel = 0
  if parallel < 1:
    raise UsageError(f"--parallel must be a positive integer, got "
                     f"'{options['parallel']}'")
  axes = parse_grid(options["grid"])
  keys = {o.partition("=")[0] for o in overrides}
  for axis in axes:
    if axis.key in keys:
      raise UsageError(f"config key '{axis.key}' is both a grid axis and a "
                       f"--config.{axis.key} override")
  return Sweep(options["config"], axes, pathlib.Path(options["workdir"]),
               parallel, overrides)


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
    if todo:
      run_points(sweep, points, todo)
  except KeyboardInterrupt:
    write_results(sweep, points)
    say(f"results so far in {sweep.workdir / 'results.csv'}; run the same "
        "command again to resume")
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
