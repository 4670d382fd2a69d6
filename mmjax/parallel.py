"""Device mesh and shardings: data parallel, FSDP and tensor parallel.

Two kinds of mesh:

  make_mesh(n)          one axis, `data`, over the first n devices (0 = all):
                        the data-parallel mesh of `config.mesh_devices`.
  make_mesh(n, axes)    three axes, `data` x `fsdp` x `model`, with the sizes
                        of `axes` (`config.mesh`, e.g. {"data": 2, "fsdp": 2,
                        "model": 2}; -1 = the rest of the devices).

Batches are split along their leading axis over the batch axes, `data` and
`fsdp` together (`batch_axes`): a 2 x 2 x 2 mesh has 4 batch shards, each
held by the 2 devices of a `model` group. Parameters and optimizer state:

  tensor parallel  the shared layers (`mmjax.models.layers`: attention and
                   feed-forward of ViT, BERT, the text decoders and the
                   token fusions) name their parameters' axes ("embed",
                   "heads", "kv", "mlp", `nn.with_logical_partitioning`);
                   `LOGICAL_RULES` map them to mesh axes: attention heads and
                   feed-forward hidden units along `model` (Megatron-style:
                   q/k/v split by output heads, the out projection by input
                   heads, the first MLP kernel by columns, the second by
                   rows), so every `model` device holds 1/model of them.
  FSDP             every array of at least `min_fsdp_size` elements is also
                   split along its largest dimension not already split and
                   divisible by the FSDP axes: `fsdp`, and with strategy
                   "fsdp" (`config.sharding`) `data` too (ZeRO-3 over all the
                   batch shards, as the 1-D mesh does it).
  replicated       everything else. Mesh axes of size 1 are left out of the
                   specs, so a data x 1 x 1 mesh shards as the 1-D mesh does.

Optimizer state (Adam's mu and nu) gets its parameter's sharding
(`state_shardings(..., params=...)`).
"""

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmjax.errors import UsageError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, MODEL_AXIS)  # outermost to innermost
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
STRATEGIES = ("dp", "fsdp")

# Logical axis names of the parameters (`mmjax.models.layers`) -> mesh axes,
# in flax's format (`nn.logical_to_mesh_sharding`: the first rule that
# matches a name wins). `config.logical_rules` entries come before these.
#   embed   the model width D (q/k/v kernels [D, H, Dh], out [H, Dh, D],
#           feed-forward [D, F] and [F, D])
#   heads   attention heads H
#   kv      the head dimension Dh
#   mlp     feed-forward hidden units F
#   layers  the stacked layer axis of `scan_layers`
LOGICAL_RULES = (
    ("heads", MODEL_AXIS),
    ("mlp", MODEL_AXIS),
    ("embed", None),
    ("kv", None),
    ("layers", None),
)


# ------------------------------------------------------------------ mesh ---


def _devices(num_devices: int) -> list:
  """The first `num_devices` devices (0 = all), UsageError if too many."""
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise UsageError(f"config key 'mesh_devices' is {num_devices}, but "
                     f"{len(devices)} devices are available")
  return devices[:num_devices or len(devices)]


def mesh_shape(axes: Mapping[str, int], num_devices: int | None = None
               ) -> dict:
  """`config.mesh` {axis: size} -> {"data": d, "fsdp": f, "model": m} with
  d * f * m == num_devices: a missing axis has size 1, one axis may be -1
  (the devices the others leave). UsageError naming `mesh.<axis>` for an
  unknown axis, a size that is not a positive integer or -1, or sizes that
  do not multiply to `num_devices`. num_devices None checks the names and
  sizes only (and leaves -1 in the result)."""
  for name, size in axes.items():
    if name not in MESH_AXES:
      raise UsageError(f"config key 'mesh' has unknown axis '{name}' "
                       f"(known: {', '.join(MESH_AXES)})")
    if isinstance(size, bool) or not isinstance(size, int) or (
        size < 1 and size != -1):
      raise UsageError(f"config key 'mesh.{name}' must be a positive integer "
                       f"or -1 (the rest of the devices), got {size!r}")
  shape = {name: axes.get(name, 1) for name in MESH_AXES}
  free = [name for name, size in shape.items() if size == -1]
  if len(free) > 1:
    raise UsageError(f"config key 'mesh': only one axis may be -1, got "
                     f"{' and '.join(free)}")
  if num_devices is None:
    return shape
  fixed = math.prod(size for size in shape.values() if size != -1)
  sizes = " x ".join(f"{n}={s}" for n, s in shape.items())
  if free and num_devices % fixed == 0:
    shape[free[0]] = num_devices // fixed
  elif free or fixed != num_devices:
    devices = "device" if num_devices == 1 else "devices"
    raise UsageError(f"config key 'mesh': axis sizes {sizes} do not multiply "
                     f"to the {num_devices} {devices} of the mesh")
  return shape


def make_mesh(num_devices: int = 0,
              axes: Mapping[str, int] | None = None) -> Mesh:
  """The first `num_devices` devices (0 = all of them) as a 1-D `data` mesh,
  or with `axes` ({axis: size}, `mesh_shape`) as a data x fsdp x model mesh,
  `model` innermost (a model group is consecutive devices)."""
  devices = _devices(num_devices)
  if axes is None:
    return Mesh(np.array(devices), (DATA_AXIS,))
  shape = mesh_shape(axes, len(devices))
  return Mesh(np.array(devices).reshape(tuple(shape.values())), MESH_AXES)


# ----------------------------------------------------------------- batch ---


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over: ("data",) or ("data", "fsdp")."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_axis(mesh: Mesh):
  """`batch_axes` as one PartitionSpec entry (and shard_map / collective
  axis name): "data" on the 1-D mesh, ("data", "fsdp") on the 3-axis one."""
  axes = batch_axes(mesh)
  return axes[0] if len(axes) == 1 else axes


def batch_shards(mesh: Mesh) -> int:
  """How many blocks the batch is split into: data * fsdp."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the batch axes (`batch_axis`)."""
  return NamedSharding(mesh, P(batch_axis(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "batch_size"):
  """The global batch must split evenly over the batch axes."""
  n = batch_shards(mesh)
  if batch_size % n:
    where = (f"the {n} devices of the mesh" if n == mesh.size else
             f"the {n} batch shards (mesh axes "
             f"{' x '.join(batch_axes(mesh))}) of the mesh")
    raise UsageError(f"config key '{key}' is {batch_size}, not divisible by "
                     f"{where}")


# ------------------------------------------------------ state shardings ---


def fsdp_axes(mesh: Mesh, strategy: str = "dp") -> tuple[str, ...]:
  """The mesh axes (of size > 1) that FSDP splits large arrays over: `fsdp`,
  and with strategy "fsdp" also `data`."""
  if strategy not in STRATEGIES:
    raise UsageError(f"unknown sharding strategy '{strategy}' "
                     f"(known: {', '.join(STRATEGIES)})")
  axes = BATCH_AXES if strategy == "fsdp" else (FSDP_AXIS,)
  return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def _entry(axes: Sequence[str]):
  """Mesh axes -> one PartitionSpec entry (None, a name or a tuple)."""
  axes = tuple(axes)
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def leaf_spec(shape: Sequence[int], mesh: Mesh, strategy: str = "dp",
              min_fsdp_size: int = 2**14, tensor_spec: P = P()) -> P:
  """The PartitionSpec of one array of `shape`: `tensor_spec` (its tensor
  parallel mesh axes, one entry per leading dimension), less the mesh axes
  of size 1, then for an array of at least `min_fsdp_size` elements the FSDP
  axes (`fsdp_axes`) on its largest dimension that is not split yet and is
  divisible by their size. P() for a replicated array."""
  spec = [_entry(a for a in _axes_of(e) if mesh.shape[a] > 1)
          for e in tuple(tensor_spec)]
  spec += [None] * (len(shape) - len(spec))
  axes = fsdp_axes(mesh, strategy)
  n = math.prod(mesh.shape[a] for a in axes)
  if axes and np.prod(shape, dtype=np.int64) >= min_fsdp_size:
    for dim in np.argsort(shape)[::-1]:
      if spec[dim] is None and shape[dim] % n == 0:
        spec[dim] = _entry(axes)
        break
  return P(*spec) if any(e is not None for e in spec) else P()


def mesh_rules(mesh: Mesh | None, rules: Sequence = ()) -> tuple:
  """`rules` (pairs logical name -> mesh axes, e.g. `config.logical_rules`)
  before `LOGICAL_RULES`, with the mesh axes that `mesh` lacks (the 1-D mesh
  has no `model`; None: a mesh with all of `MESH_AXES`) mapped to None.
  UsageError naming `logical_rules` for an entry that is not such a pair or
  a mesh axis that is not one of `MESH_AXES`."""
  names = MESH_AXES if mesh is None else mesh.axis_names
  out = []
  for rule in tuple(rules) + LOGICAL_RULES:
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2
        or not isinstance(rule[0], str)):
      raise UsageError(f"config key 'logical_rules': {rule!r} is not a pair "
                       "(logical axis name, mesh axes)")
    name, target = rule
    if target is not None and not isinstance(target, (str, tuple, list)):
      raise UsageError(f"config key 'logical_rules': the mesh axes of "
                       f"'{name}' must be a name, a tuple of names or None, "
                       f"got {target!r}")
    unknown = [a for a in _axes_of(target) if a not in MESH_AXES]
    if unknown:
      raise UsageError(f"config key 'logical_rules': mesh axis '{unknown[0]}' "
                       f"of '{name}' is not one of {', '.join(MESH_AXES)}")
    out.append((name, _entry(a for a in _axes_of(target)
                             if a in names)))
  return tuple(out)


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _check_divisible(path, shape, logical: P, spec: P, mesh: Mesh):
  """UsageError naming the parameter and the mesh axis when a dimension is
  not divisible by the mesh axes that tensor parallelism splits it over."""
  for dim, entry in enumerate(tuple(spec)):
    axes = _axes_of(entry)
    size = math.prod(mesh.shape[a] for a in axes)
    if size > 1 and shape[dim] % size:
      names = tuple(logical)
      what = names[dim] if dim < len(names) and names[dim] else "dimension"
      raise UsageError(
          f"config key 'mesh.{axes[0]}' is {size}: parameter "
          f"'{_path_name(path)}' has {shape[dim]} {what} (dimension {dim} of "
          f"{tuple(shape)}), not divisible by it")


def param_shardings(abstract_params, logical_specs, mesh: Mesh,
                    strategy: str = "dp", rules: Sequence = (),
                    min_fsdp_size: int = 2**14):
  """NamedShardings of the parameters.

  abstract_params: the (unboxed) parameter tree of ShapeDtypeStructs.
  logical_specs: the same tree of logical PartitionSpecs
    (`nn.get_partition_spec` of the boxed tree: P("embed", "heads", "kv")
    for an attention query kernel [D, H, Dh], P() for a parameter without
    names).
  rules: logical axis rules placed before `LOGICAL_RULES` (`mesh_rules`).

  Each parameter is split along the mesh axes its logical names map to
  (`nn.logical_to_mesh_sharding`), then FSDP (`leaf_spec`). UsageError
  naming the parameter if tensor parallelism cannot split a dimension.
  """
  tensor = nn.logical_to_mesh_sharding(logical_specs, mesh,
                                       mesh_rules(mesh, rules))

  def one(path, leaf, sharding):
    _check_divisible(path, leaf.shape, _logical_at(logical_specs, path),
                     sharding.spec, mesh)
    return NamedSharding(mesh, leaf_spec(leaf.shape, mesh, strategy,
                                         min_fsdp_size, sharding.spec))

  return jax.tree_util.tree_map_with_path(one, abstract_params, tensor)


def _logical_at(tree, path):
  for key in path:
    tree = tree[getattr(key, "key", getattr(key, "idx", key))]
  return tree


def _dict_suffix(path) -> tuple:
  """The trailing dictionary keys of a pytree path: a parameter's path
  ("tower_image", ..., "kernel") inside an optimizer state's mu or nu."""
  keys = []
  for key in reversed(path):
    if not isinstance(key, jax.tree_util.DictKey):
      break
    keys.append(key.key)
  return tuple(reversed(keys))


def _fits(sharding: NamedSharding, shape: tuple) -> bool:
  """Whether `sharding` can split an array of `shape`."""
  if len(sharding.spec) > len(shape):
    return False
  try:
    sharding.shard_shape(shape)
  except ValueError:
    return False
  return True


def state_shardings(abstract_state, mesh: Mesh, strategy: str = "dp",
                    min_fsdp_size: int = 2**14, params=None):
  """Shardings for every leaf of an abstract (eval_shape) state.

  params: the parameters' shardings (`param_shardings`), or None. A leaf
  whose path ends with a parameter's path (its trailing dictionary keys
  end with the parameter's: the parameter itself, Adam's mu and nu of it,
  since `optax` states hold trees of the parameters' structure; the
  longest such path wins) and that the parameter's sharding can split gets
  that sharding; every other leaf `leaf_spec`'s (FSDP or replicated).
  """
  fsdp_axes(mesh, strategy)  # checks the strategy's name
  by_path = {}
  if params is not None:
    for path, sharding in jax.tree_util.tree_flatten_with_path(params)[0]:
      by_path[_dict_suffix(path)] = sharding

  def leaf_sharding(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    suffix = _dict_suffix(path)
    for start in range(len(suffix)):  # the longest match first
      sharding = by_path.get(suffix[start:])
      if sharding is not None and _fits(sharding, shape):
        return sharding
    return NamedSharding(mesh, leaf_spec(shape, mesh, strategy,
                                         min_fsdp_size))

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def put_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """This process's numpy batch -> global jax.Arrays sharded along batch."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)
