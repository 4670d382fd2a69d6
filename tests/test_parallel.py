"""mmjax.parallel: the mesh, batch-size checks, state shardings, batches.

Run on the 8 simulated CPU devices that tests/conftest.py asks XLA for.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import parallel
from mmjax.errors import UsageError

NUM_DEVICES = 8


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) == NUM_DEVICES, "conftest.py sets 8 CPU devices"
  return parallel.make_mesh()


def test_make_mesh_over_all_or_some_devices(mesh):
  assert mesh.axis_names == (parallel.DATA_AXIS,)
  assert mesh.shape[parallel.DATA_AXIS] == NUM_DEVICES
  assert list(mesh.devices) == jax.devices()
  four = parallel.make_mesh(4)
  assert four.shape[parallel.DATA_AXIS] == 4
  assert list(four.devices) == jax.devices()[:4]
  assert parallel.make_mesh(NUM_DEVICES).devices.tolist() == jax.devices()


@pytest.mark.parametrize("num_devices", [-1, NUM_DEVICES + 1])
def test_make_mesh_rejects_more_devices_than_there_are(num_devices):
  with pytest.raises(UsageError, match=f"'mesh_devices' is {num_devices}, "
                     f"but {NUM_DEVICES} devices"):
    parallel.make_mesh(num_devices)


def test_check_batch_size(mesh):
  parallel.check_batch_size(16, mesh)
  parallel.check_batch_size(NUM_DEVICES, mesh)
  with pytest.raises(UsageError, match="'batch_size' is 12, not divisible by "
                     f"the {NUM_DEVICES} devices"):
    parallel.check_batch_size(12, mesh)
  with pytest.raises(UsageError, match="'eval.batch_size' is 3"):
    parallel.check_batch_size(3, mesh, key="eval.batch_size")
  parallel.check_batch_size(3, parallel.make_mesh(1))  # one device takes all


def abstract_state():
  """An eval_shape-like state: leaves large and small, divisible and not."""
  leaf = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  return {
      "params": {
          "wide": leaf(24, 1024),  # 24,576 >= 2**14: split along 1024
          "tall": leaf(1024, 24),  # split along 1024, the first axis
          "odd_largest": leaf(1001, 32),  # 1001 % 8: split along 32
          "indivisible": leaf(129, 131),  # 16,899, no axis divisible by 8
          "small": leaf(16, 8),  # 128 < 2**14
          "bias": leaf(1024,),  # 1,024 < 2**14
      },
      "opt_state": {"count": jax.ShapeDtypeStruct((), jnp.int32),
                    "mu": {"wide": leaf(24, 1024)}},
      "step": 0,  # not an array: no shape, replicated
  }


def specs(shardings):
  return jax.tree.map(lambda s: s.spec, shardings,
                      is_leaf=lambda s: isinstance(s, NamedSharding))


def test_dp_replicates_everything(mesh):
  shardings = parallel.state_shardings(abstract_state(), mesh, "dp")
  leaves = jax.tree.leaves(shardings,
                           is_leaf=lambda s: isinstance(s, NamedSharding))
  assert len(leaves) == len(jax.tree.leaves(abstract_state()))
  for sharding in leaves:
    assert isinstance(sharding, NamedSharding) and sharding.mesh == mesh
    assert sharding.spec == P()
  assert parallel.state_shardings(abstract_state(), mesh) == shardings


def test_fsdp_splits_large_leaves_along_their_largest_divisible_axis(mesh):
  got = specs(parallel.state_shardings(abstract_state(), mesh, "fsdp"))
  data = parallel.DATA_AXIS
  assert got["params"] == {
      "wide": P(None, data), "tall": P(data, None),
      "odd_largest": P(None, data), "indivisible": P(), "small": P(),
      "bias": P()}
  assert got["opt_state"] == {"count": P(), "mu": {"wide": P(None, data)}}
  assert got["step"] == P()
  # min_fsdp_size decides what is large enough.
  low = specs(parallel.state_shardings(abstract_state(), mesh, "fsdp",
                                       min_fsdp_size=64))
  assert low["params"]["small"] == P(data, None)  # 16 x 8: along 16
  assert low["params"]["bias"] == P(data)
  assert low["opt_state"]["count"] == P()


def test_fsdp_shardings_place_real_arrays(mesh):
  shardings = parallel.state_shardings(abstract_state(), mesh, "fsdp")
  wide = jax.device_put(np.ones((24, 1024), np.float32),
                        shardings["params"]["wide"])
  assert {s.data.shape for s in wide.addressable_shards} == {(24, 128)}
  odd = jax.device_put(np.ones((129, 131), np.float32),
                       shardings["params"]["indivisible"])
  assert {s.data.shape for s in odd.addressable_shards} == {(129, 131)}


def test_unknown_strategy_raises(mesh):
  with pytest.raises(UsageError, match="unknown sharding strategy 'zero3' "
                     r"\(known: dp, fsdp\)"):
    parallel.state_shardings(abstract_state(), mesh, "zero3")


def test_put_batch_shards_along_the_batch_axis(mesh):
  batch_size = 2 * NUM_DEVICES
  local = {"image": np.arange(batch_size * 3, dtype=np.float32).reshape(
               batch_size, 3),
           "mask/image": np.arange(batch_size) % 3 != 0,
           "label": np.arange(batch_size, dtype=np.int32)}
  sharding = parallel.batch_sharding(mesh)
  assert sharding.spec == P(parallel.DATA_AXIS)
  batch = parallel.put_batch(local, sharding)
  assert sorted(batch) == sorted(local)
  for key, value in batch.items():
    assert isinstance(value, jax.Array)
    assert value.shape == local[key].shape and value.dtype == local[key].dtype
    assert value.sharding == sharding
    np.testing.assert_array_equal(np.asarray(value), local[key])
    shards = sorted(value.addressable_shards, key=lambda s: s.index[0].start)
    assert len(shards) == NUM_DEVICES
    for i, shard in enumerate(shards):
      assert shard.index[0] == slice(2 * i, 2 * i + 2)
      assert shard.device == mesh.devices[i]
      np.testing.assert_array_equal(np.asarray(shard.data),
                                    local[key][2 * i:2 * i + 2])


def test_replicated(mesh):
  x = jax.device_put(np.arange(4.0), parallel.replicated(mesh))
  assert len(x.addressable_shards) == NUM_DEVICES
  for shard in x.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), np.arange(4.0))


# ------------------------------------------- data x fsdp x model meshes ---


@pytest.fixture(scope="module")
def mesh3():
  return parallel.make_mesh(0, {"data": 2, "fsdp": 2, "model": 2})


def test_leaf_spec_adds_fsdp_to_tensor_parallel_axes(mesh3):
  model = parallel.MODEL_AXIS
  # A 64 x 256 kernel split by model on 256: fsdp takes the 64.
  assert parallel.leaf_spec((64, 256), mesh3, "dp", 2**14,
                            P(None, model)) == P(parallel.FSDP_AXIS, model)
  # Strategy fsdp splits over data and fsdp together.
  assert parallel.leaf_spec((64, 256), mesh3, "fsdp", 2**14,
                            P(None, model)) == P(("data", "fsdp"), model)
  assert parallel.leaf_spec((8, 8), mesh3, "dp", 2**14,
                            P(model)) == P(model, None)
  assert parallel.leaf_spec((8, 8), mesh3) == P()
  # Mesh axes of size 1 are left out: 8 x 1 x 1 shards as the 1-D mesh.
  flat = parallel.make_mesh(0, {"data": 8})
  assert parallel.leaf_spec((64, 256), flat, "dp", 2**14, P(None, model)) == P()
  assert parallel.leaf_spec((64, 256), flat, "fsdp") == P(None, "data")


def test_batch_axes_of_both_meshes(mesh, mesh3):
  assert parallel.batch_axis(mesh) == parallel.DATA_AXIS
  assert parallel.batch_shards(mesh) == NUM_DEVICES
  assert parallel.batch_axis(mesh3) == ("data", "fsdp")
  assert parallel.batch_shards(mesh3) == 4
  batch = parallel.put_batch({"x": np.arange(8.0)},
                             parallel.batch_sharding(mesh3))["x"]
  # Each model pair of devices holds the same 2 rows.
  rows = {d.id: s.index[0].start for s in batch.addressable_shards
          for d in [s.device]}
  devices = mesh3.devices.reshape(4, 2)
  for i, pair in enumerate(devices):
    assert {rows[d.id] for d in pair} == {2 * i}


def test_optimizer_state_takes_its_parameters_sharding(mesh3):
  leaf = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  params = {"dense": {"kernel": leaf(64, 256), "bias": leaf(256)},
            "scale": leaf(64)}
  logical = {"dense": {"kernel": P("embed", "mlp"), "bias": P("mlp")},
             "scale": P()}
  shardings = parallel.param_shardings(params, logical, mesh3)
  spec = lambda s: s.spec
  assert jax.tree.map(spec, shardings) == {
      "dense": {"kernel": P("fsdp", "model"), "bias": P("model")},
      "scale": P()}
  import optax  # pylint: disable=import-outside-toplevel
  state = {"params": params,
           "opt_state": jax.eval_shape(optax.adam(1e-3).init, params)}
  got = parallel.state_shardings(state, mesh3, params=shardings)
  adam = got["opt_state"][0]
  assert adam.mu == shardings and adam.nu == shardings
  assert got["params"] == shardings
  assert adam.count.spec == P()
