"""Multi-host runs: JAX's multi-controller runtime, started by every entry
point before anything touches a device.

Every process of a multi-host run runs the same command. `initialize`
starts `jax.distributed` when

  * the flags `--coordinator HOST:PORT --num_processes N --process_id I`
    are given (all three; process 0 serves the coordinator at HOST:PORT), or
  * JAX's own cluster detection (what `jax.distributed.initialize()` with no
    arguments uses: Slurm `srun` tasks, Open MPI, Kubernetes, Cloud TPU pod
    slices) finds an environment of more than one process.

Otherwise the run is single-process and nothing changes. On CPU the
processes' collectives go through gloo (`jax_cpu_collectives_implementation`),
which is how the multi-process tests run on one machine.
"""

import os

from mmjax.errors import UsageError

FLAGS = {
    "--coordinator": "HOST:PORT of process 0 (multi-host runs outside a "
                     "cluster that JAX detects; with the two flags below)",
    "--num_processes": "the number of processes of a multi-host run",
    "--process_id": "this process's index, 0 to num_processes - 1",
}


def detected_cluster() -> tuple[str, int] | None:
  """(environment name, process count) of the cluster JAX detects, or None.

  Asks the cluster environments that `jax.distributed.initialize()` consults
  (jax._src.clusters: JAX has no public query), in JAX's order.
  """
  try:
    from jax._src import clusters  # pylint: disable=import-outside-toplevel
    environments = clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return None
  for env in environments:
    if getattr(env, "opt_in_only_method", False):
      continue
    try:
      if env.is_env_present():
        return env.__name__, int(env.get_process_count())
    except Exception:  # pylint: disable=broad-exception-caught
      continue  # an environment that cannot answer is not this one
  return None


def _count(flag: str, value) -> int | None:
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise UsageError(f"{flag} takes an integer, got '{value}'") from None


def initialize(coordinator: str | None = None,
               num_processes: str | int | None = None,
               process_id: str | int | None = None) -> bool:
  """Starts jax.distributed if the flags or the environment ask for it
  (module docstring); returns whether it did. UsageError for incomplete or
  inconsistent flags."""
  import jax  # pylint: disable=import-outside-toplevel
  given = {"--coordinator": coordinator, "--num_processes": num_processes,
           "--process_id": process_id}
  n = _count("--num_processes", num_processes)
  i = _count("--process_id", process_id)
  if any(v is not None for v in given.values()):
    missing = [flag for flag, v in given.items() if v is None]
    if missing:
      raise UsageError(f"{', '.join(missing)} missing: a multi-host run "
                       "needs --coordinator, --num_processes and "
                       "--process_id together")
    if n < 1 or not 0 <= i < n:
      raise UsageError(f"--process_id {i} is not in [0, --num_processes "
                       f"{n})")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise UsageError(f"--coordinator takes HOST:PORT, got '{coordinator}'")
    kwargs = dict(coordinator_address=coordinator, num_processes=n,
                  process_id=i)
  else:
    cluster = detected_cluster()
    if cluster is None or cluster[1] <= 1:
      return False
    n, kwargs = cluster[1], {}
  if n == 1:
    return False
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):  # else: theirs
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:  # e.g. no coordinator answered
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    where = kwargs.get("coordinator_address", "the cluster's coordinator")
    raise UsageError(f"jax.distributed could not start with {where} "
                     f"({n} processes): {first[:300]}") from None
  return True
