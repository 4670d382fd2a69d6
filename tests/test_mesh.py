"""The data x fsdp x model mesh (mmjax.parallel): one train step of a ViT +
BERT contrastive model and of a token fusion classifier on 8 simulated
devices gives the loss and gradients of 1 device, with the parameters split
as the mesh says (tensor parallel heads and MLP units along `model`, FSDP
along `fsdp`)."""

import functools
import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import configs, experiment, objectives, parallel, train
from mmjax.errors import UsageError
from mmjax.models.factory import build_classifier, build_contrastive

WIDTH, HEADS, MLP = 64, 8, 256  # MLP kernels 64 x 256 = 2**14: FSDP-sized
VIT = {"name": "vit", "width": WIDTH, "depth": 1, "mlp_dim": MLP,
       "num_heads": HEADS, "patch_size": 4}
BERT = {"name": "bert", "vocab_size": 32, "hidden_size": WIDTH,
        "num_layers": 1, "num_heads": HEADS, "intermediate_size": MLP,
        "max_position_embeddings": 8, "dropout": 0.0}
BATCH = 8
MESHES = {"8x1x1": {"data": 8, "fsdp": 1, "model": 1},
          "2x2x2": {"data": 2, "fsdp": 2, "model": 2},
          "1x1x8": {"data": 1, "fsdp": 1, "model": 8}}


def make_config(objective):
  """A config whose optimizer is plain SGD at learning rate 1, so one step
  moves every parameter by minus its gradient."""
  config = configs.load_config(f"configs/coco_mini.py:objective={objective}")
  config.frozen = ""  # coco_mini locks its text tower
  return configs.apply_overrides(config, [
      "optimizer.name=sgd", "optimizer.momentum=0.0",
      "optimizer.weight_decay=0.0", "optimizer.learning_rate=1.0",
      "optimizer.warmup_steps=0", "optimizer.schedule=constant",
      "optimizer.grad_clip_norm=0.0"])


def make_batch():
  rng = np.random.default_rng(0)
  return {"image": rng.uniform(0, 1, (BATCH, 8, 8, 3)).astype(np.float32),
          "text": rng.integers(1, 32, (BATCH, 8)).astype(np.int32),
          "mask/image": np.ones(BATCH, bool), "mask/text": np.ones(BATCH, bool),
          "label": rng.integers(0, 5, BATCH).astype(np.int32)}


def contrastive_model(objective):
  return build_contrastive(modalities=("image", "text"),
                           encoders={"image": {**VIT, "pool": "gap"},
                                     "text": {**BERT, "pool": "mean"}},
                           embed_dim=16, objective=objective.split("_")[0])


def fusion_model():
  """Bottleneck fusion (one layer of a block per modality) of the ViT and
  BERT token embeddings (no encoder blocks: the fusion's attention and MLPs
  are what the mesh splits)."""
  return build_classifier(
      modalities=("image", "text"),
      encoders={"image": {**VIT, "depth": 0, "pool": "none"},  # tokens
                "text": {**BERT, "num_layers": 0, "pool": "none"}},
      fusion="bottleneck", num_classes=5, head_hidden=(),
      fusion_kwargs={"dim": WIDTH, "num_heads": HEADS, "mlp_dim": MLP,
                     "num_layers": 1, "fusion_layer": 0})


def train_state(config, model, tx, mesh, initial=None):
  """(state, shardings) from `experiment.create_train_state` on `mesh`; with
  `initial` (a state on 1 device) the shardings alone are traced
  (`jax.eval_shape`, nothing compiled) and `initial` is put into them."""
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
          for k, v in make_batch().items()}
  create = lambda: experiment.create_train_state(config, model, tx, spec, mesh)
  if initial is None:
    return create()
  got = {}

  def trace():
    state, got["shardings"] = create()
    return state

  jax.eval_shape(trace)
  return jax.device_put(initial, got["shardings"]), got["shardings"]


def one_step(config, model, mesh, initial=None):
  """(loss, gradients, per-device parameter bytes, state, shardings) of one
  jitted train step on `mesh` (`train_state`)."""
  tx, _ = experiment.build_optimizer(config)
  state, shardings = train_state(config, model, tx, mesh, initial)
  before = jax.device_get(state.params)
  objective = objectives.make_objective(config.objective, mesh)
  step = jax.jit(train.make_train_step(model, tx, objective),
                 in_shardings=(shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(shardings, None))
  batch = parallel.put_batch(make_batch(), parallel.batch_sharding(mesh))
  compiled = step.lower(state, batch).compile()
  params_in = compiled.input_shardings[0][0].params
  device_bytes = sum(
      math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
      for s, x in zip(jax.tree.leaves(params_in), jax.tree.leaves(before)))
  new_state, metrics = compiled(state, batch)
  grads = jax.tree.map(lambda a, b: a - b, before,
                       jax.device_get(new_state.params))
  return float(metrics["loss"]), grads, device_bytes, state, shardings


def bytes_on(device, tree):
  return sum(s.data.nbytes for x in jax.tree.leaves(tree)
             for s in x.addressable_shards if s.device == device)


def flat(tree):
  return {"/".join(str(k.key) for k in path): x
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


MODELS = {
    "softmax": lambda: (make_config("softmax"), contrastive_model("softmax")),
    "sigmoid_ring": lambda: (make_config("sigmoid_ring"),
                             contrastive_model("sigmoid_ring")),
    "fusion": lambda: (configs.apply_overrides(make_config("softmax"),
                                               ["objective=supervised"]),
                       fusion_model()),
}


@functools.cache
def on_one_device(kind):
  """(loss, gradients, parameter bytes, initial state) of one step of
  MODELS[kind] on 1 device."""
  loss, grads, device_bytes, state, _ = one_step(*MODELS[kind](),
                                                 parallel.make_mesh(1))
  return loss, grads, device_bytes, jax.device_get(state)


def check_same_as_one_device(kind, mesh_name):
  """One step of MODELS[kind] on the mesh MESHES[mesh_name]: the loss and
  gradients of 1 device; returns (per-device parameter bytes, 1 device's
  bytes, the parameters by path, shardings). On 2x2x2 the state is
  initialised on the mesh (and is 1 device's); on the others 1 device's
  initial state is put into the mesh's shardings (one compilation less)."""
  loss_1, grads_1, bytes_1, initial = on_one_device(kind)
  mesh = parallel.make_mesh(0, MESHES[mesh_name])
  loss, grads, device_bytes, state, shardings = one_step(
      *MODELS[kind](), mesh, None if mesh_name == "2x2x2" else initial)
  if mesh_name == "2x2x2":
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
                 initial.params)
  np.testing.assert_allclose(loss, loss_1, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                      atol=1e-5),
               grads, grads_1)
  # The compiled step's input shardings are the arrays' own.
  assert device_bytes == bytes_on(jax.devices()[0], state.params)
  print(f"{kind} {mesh_name}: {device_bytes} parameter bytes per device "
        f"(1 device: {bytes_1})")
  return device_bytes, bytes_1, flat(state.params), shardings


def split_by_model(params) -> int:
  """Bytes of the parameters that tensor parallelism splits: attention
  q/k/v kernels and biases, out kernels, the MLPs' first kernel and bias
  and second kernel."""
  return sum(x.nbytes for k, x in params.items()
             if "/attention/" in k and not k.endswith("out/bias")
             or "mlp/dense_0/" in k or k.endswith("mlp/dense_1/kernel"))


def fsdp_sized(params) -> int:
  """Bytes of the parameters FSDP splits (at least 2**14 elements)."""
  return sum(x.nbytes for x in params.values() if x.size >= 2**14)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_contrastive_step_same_on_every_mesh(mesh_name):
  device_bytes, bytes_1, params, shardings = check_same_as_one_device(
      "softmax", mesh_name)
  shard = lambda key: params[key].addressable_shards[0].data.shape
  mlp = "tower_image/encoder/block_0/mlp/dense_0/kernel"
  query = "tower_text/encoder/layer_0/attention/query/kernel"
  out = "tower_text/encoder/layer_0/attention/out/kernel"
  split, big = split_by_model(params), fsdp_sized(params)
  if mesh_name == "8x1x1":  # data parallel: everything replicated
    assert device_bytes == bytes_1
  elif mesh_name == "1x1x8":  # heads and hidden units 1/8 per device
    assert shard(mlp) == (WIDTH, MLP // 8)
    assert shard(query) == (WIDTH, 1, WIDTH // HEADS)  # one head each
    assert shard(out) == (1, WIDTH // HEADS, WIDTH)
    assert device_bytes == bytes_1 - split * 7 // 8
  else:  # 2x2x2: heads and hidden units / 2, MLP kernels / 2 again (fsdp)
    assert shard(mlp) == (WIDTH // 2, MLP // 2)
    assert shard(query) == (WIDTH, HEADS // 2, WIDTH // HEADS)
    spec = flat(shardings.params)[mlp].spec
    assert spec == P(parallel.FSDP_AXIS, parallel.MODEL_AXIS)
    assert big and all(k in params and "mlp" in k for k in
                       [k for k, x in params.items() if x.size >= 2**14])
    assert device_bytes == bytes_1 - split // 2 - big // 4


def test_ring_siglip_step_same_on_the_2x2x2_mesh():
  device_bytes, bytes_1, _, _ = check_same_as_one_device("sigmoid_ring",
                                                         "2x2x2")
  assert device_bytes < bytes_1 // 2


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_token_fusion_step_same_on_every_mesh(mesh_name):
  device_bytes, bytes_1, params, shardings = check_same_as_one_device(
      "fusion", mesh_name)
  key = "fusion/block_0_image/attention/key/kernel"
  split = split_by_model(params)
  assert any(k.startswith("fusion/") for k in params if "/attention/" in k)
  if mesh_name == "8x1x1":
    assert device_bytes == bytes_1
  elif mesh_name == "1x1x8":
    assert flat(shardings.params)[key].spec == P(None, parallel.MODEL_AXIS,
                                                 None)
    assert device_bytes == bytes_1 - split * 7 // 8
  else:
    assert device_bytes == (bytes_1 - split // 2
                            - fsdp_sized(params) // 4)


def test_optimizer_state_is_sharded_as_its_parameter():
  """Adam's mu and nu get their parameter's sharding (shapes only: the
  state is traced under eval_shape, not compiled)."""
  config = configs.apply_overrides(make_config("softmax"),
                                   ["optimizer.name=adamw"])
  mesh = parallel.make_mesh(0, MESHES["2x2x2"])
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
          for k, v in make_batch().items()}
  tx, _ = experiment.build_optimizer(config)
  got = {}

  def build():
    state, got["shardings"] = experiment.create_train_state(
        config, contrastive_model("softmax"), tx, spec, mesh)
    return state

  jax.eval_shape(build)
  shardings = got["shardings"]
  params = flat(shardings.params)
  adam = [s for s in jax.tree.leaves(shardings.opt_state,
                                     is_leaf=lambda x: hasattr(x, "mu"))
          if hasattr(s, "mu")]
  assert adam
  for moment in (adam[0].mu, adam[0].nu):
    assert flat(moment) == params
  assert P(None, parallel.MODEL_AXIS, None) in {s.spec for s in params.values()}


def test_ring_siglip_rotates_over_the_batch_shards():
  """On 2 x 2 x 2 the ring passes blocks around the 4 data x fsdp shards."""
  mesh = parallel.make_mesh(0, MESHES["2x2x2"])
  rng = np.random.default_rng(1)
  x, y = (rng.normal(size=(8, 16)).astype(np.float32) for _ in range(2))
  objective = objectives.make_objective("sigmoid_ring", mesh)
  plain = objectives.make_objective("sigmoid", None)
  outputs = {"embedding/a": x, "embedding/b": y,
             "log_scale": np.float32(np.log(10.0)), "bias": np.float32(-10.0)}
  sharding = parallel.batch_sharding(mesh)
  sharded = {k: jax.device_put(v, sharding) if np.ndim(v) else v
             for k, v in outputs.items()}
  ring_loss = jax.jit(lambda o: objective(o, {})[0])(sharded)
  np.testing.assert_allclose(ring_loss, plain(outputs, {})[0], rtol=1e-5)
  assert parallel.batch_shards(mesh) == 4
  jaxpr = str(jax.make_jaxpr(lambda o: objective(o, {})[0])(sharded))
  assert "ppermute" in jaxpr and "('data', 'fsdp')" in jaxpr


def test_mesh_shapes_and_errors():
  mesh = parallel.make_mesh(0, {"data": -1, "model": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "model": 2}
  assert mesh.devices[0, 0].tolist() == jax.devices()[:2]  # model innermost
  assert parallel.batch_sharding(mesh).spec == P(("data", "fsdp"))
  assert parallel.make_mesh(4, {"data": 2, "fsdp": 2}).size == 4
  with pytest.raises(UsageError, match=r"config key 'mesh': axis sizes "
                     "data=2 x fsdp=2 x model=1 do not multiply to the 8"):
    parallel.make_mesh(0, {"data": 2, "fsdp": 2})
  with pytest.raises(UsageError, match="config key 'mesh' has unknown axis "
                     "'tensor'"):
    parallel.make_mesh(0, {"data": 4, "tensor": 2})
  with pytest.raises(UsageError, match="config key 'mesh.model' must be"):
    parallel.make_mesh(0, {"data": 4, "model": 0})
  with pytest.raises(UsageError, match="only one axis may be -1"):
    parallel.make_mesh(0, {"data": -1, "model": -1})
  with pytest.raises(UsageError, match=r"'batch_size' is 6, not divisible by "
                     r"the 4 batch shards \(mesh axes data x fsdp\)"):
    parallel.check_batch_size(6, mesh)
  parallel.check_batch_size(4, mesh)


def test_heads_not_divisible_by_model_names_the_parameter():
  config = make_config("softmax")
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
          for k, v in make_batch().items()}
  tx, _ = experiment.build_optimizer(config)
  # 3 heads do not split over a model axis of 2.
  model = build_contrastive(
      modalities=("image", "text"),
      encoders={"image": {**VIT, "width": 48, "num_heads": 3, "pool": "gap"},
                "text": {**BERT, "pool": "mean"}},
      embed_dim=16, objective="softmax")
  mesh = parallel.make_mesh(0, {"data": 4, "model": 2})
  with pytest.raises(UsageError, match=r"config key 'mesh.model' is 2: "
                     r"parameter 'tower_image/encoder/block_0/attention/"
                     r"\w+/\w+' has 3 heads"):
    experiment.create_train_state(config, model, tx, spec, mesh)


def test_logical_rules_override_and_check():
  mesh = parallel.make_mesh(0, MESHES["1x1x8"])
  rules = parallel.mesh_rules(mesh, (("mlp", None),))
  assert rules[0] == ("mlp", None)
  assert parallel.mesh_rules(parallel.make_mesh(8), ())[0] == ("heads", None)
  with pytest.raises(UsageError, match="config key 'logical_rules': mesh "
                     "axis 'tensor'"):
    parallel.mesh_rules(mesh, (("mlp", "tensor"),))
  shardings = parallel.param_shardings(
      {"w": jax.ShapeDtypeStruct((64, 256), np.float32)},
      {"w": P("embed", "mlp")}, mesh, rules=(("mlp", None),))
  assert shardings["w"] == NamedSharding(mesh, P())


def test_check_config_validates_the_mesh():
  config = configs.load_config("configs/avmnist.py:smoke")
  experiment.check_config(config)
  bad = configs.apply_overrides(config, ["mesh.model=0"])
  with pytest.raises(UsageError, match="'mesh.model' must be"):
    experiment.check_config(bad)
  with config.unlocked():
    config.grad_accum_steps = 4
  config = configs.apply_overrides(
      config, ["batch_size=8", "mesh.data=2", "mesh.fsdp=2", "mesh.model=2"])
  with pytest.raises(UsageError, match=r"microbatch of 2 examples is not "
                     r"divisible by the 4 batch shards \(data x fsdp\)"):
    experiment.check_config(config)


def test_scanned_layers_keep_their_logical_names():
  """With scan_layers the stacked axis is "layers" (not split) and the
  heads and hidden units are split as in the unrolled layout."""
  config = make_config("softmax")
  model = build_contrastive(
      modalities=("image", "text"),
      encoders={"image": {**VIT, "depth": 2, "scan_layers": True,
                          "pool": "gap"},
                "text": {**BERT, "pool": "mean"}},
      embed_dim=16, objective="softmax")
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
          for k, v in make_batch().items()}
  tx, _ = experiment.build_optimizer(config)
  mesh = parallel.make_mesh(0, MESHES["1x1x8"])
  got = {}

  def build():
    state, got["shardings"] = experiment.create_train_state(config, model,
                                                            tx, spec, mesh)
    return state

  params = flat(jax.eval_shape(build).params)
  shardings = flat(got["shardings"].params)
  key = "tower_image/encoder/blocks/mlp/dense_0/kernel"
  assert params[key].shape == (2, WIDTH, MLP)
  assert shardings[key].spec == P(None, None, parallel.MODEL_AXIS)
  query = "tower_image/encoder/blocks/attention/query/kernel"
  assert shardings[query].spec == P(None, None, parallel.MODEL_AXIS, None)
