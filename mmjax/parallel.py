"""Device mesh and shardings: data parallel, optionally FSDP.

The mesh has one axis, `data`, over all devices (or `config.mesh_devices` of
them). Batches are sharded along their leading axis over `data`; parameters
and optimizer state are replicated (`dp`) or, with `fsdp`, each array large
enough is split along its largest dimension divisible by the mesh size.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmjax.errors import UsageError

DATA_AXIS = "data"
STRATEGIES = ("dp", "fsdp")


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (0 = all of them)."""
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise UsageError(f"config key 'mesh_devices' is {num_devices}, but "
                     f"{len(devices)} devices are available")
  return Mesh(np.array(devices[:num_devices or len(devices)]), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "batch_size"):
  """The global batch must split evenly over the data axis."""
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise UsageError(f"config key '{key}' is {batch_size}, not divisible by "
                     f"the {n} devices of the mesh")


def state_shardings(abstract_state, mesh: Mesh, strategy: str = "dp",
                    min_fsdp_size: int = 2**14):
  """Shardings for every leaf of an abstract (eval_shape) state."""
  if strategy not in STRATEGIES:
    raise UsageError(f"unknown sharding strategy '{strategy}' "
                     f"(known: {', '.join(STRATEGIES)})")
  n = mesh.shape[DATA_AXIS]

  def leaf_sharding(leaf):
    shape = getattr(leaf, "shape", ())
    if strategy == "dp" or np.prod(shape, dtype=np.int64) < min_fsdp_size:
      return replicated(mesh)
    for axis in np.argsort(shape)[::-1]:
      if shape[axis] % n == 0:
        spec = [None] * len(shape)
        spec[axis] = DATA_AXIS
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  return jax.tree.map(leaf_sharding, abstract_state)


def put_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """This process's numpy batch -> global jax.Arrays sharded along batch."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)
