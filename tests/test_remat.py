"""Rematerialisation (config.remat) and scanned layers (config.scan_layers).

A remat policy wraps every transformer block (`mmjax.models.layers.remat`):
the parameter tree is the one without it, and loss and gradients are the
same up to float rounding. `scan_layers` runs ViT / AST / BERT layers with
nn.scan: stacked parameters, the same function of them.

Memory is not asserted here (it depends on the XLA backend); on CPU an
unrolled stack's recomputation is merged back by XLA, while under
`scan_layers` `nothing_saveable` cuts the train step's temporary memory
several-fold (reported by the benchmarks, not tested).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import test_fusion_contract as contract
from mmjax import configs, experiment, losses
from mmjax.errors import UsageError
from mmjax.models import layers
from mmjax.models.factory import build_classifier, build_contrastive
from mmjax.models.fusion import FUSIONS
from mmjax.models.layers import REMAT_POLICIES

VIT = {"name": "vit", "width": 16, "depth": 2, "mlp_dim": 32, "num_heads": 2,
       "patch_size": 4, "pool": "map", "dropout": 0.1}
BERT = {"name": "bert", "vocab_size": 40, "hidden_size": 16, "num_layers": 2,
        "num_heads": 2, "intermediate_size": 32, "max_position_embeddings": 8,
        "dropout": 0.1, "pool": "mean"}
AST = {"name": "ast", "width": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32,
       "patch": 8, "strides": (4, 4), "dropout": 0.1}
FRAMES = {"name": "frames", "frame": {"name": "lenet", "features": 2,
                                      "extra_layers": 1},
          "temporal": "transformer", "temporal_layers": 2, "num_heads": 2}
LENET = {"name": "lenet", "features": 2, "extra_layers": 1,
         "final_pool": False}
TOKEN_FUSIONS = {
    "cross_attention": dict(contract.ATTENTION, num_layers=2, dropout=0.1),
    "coattention": dict(contract.ATTENTION, layers="CT", dropout=0.1),
    "mult": dict(contract.ATTENTION, dropout=0.1),
    "perceiver": dict(dim=8, num_heads=2, num_layers=2, num_latents=4,
                      dropout=0.1),
    "bottleneck": dict(dim=8, num_heads=2, num_layers=2, fusion_layer=1,
                       dropout=0.1),
}


def contrastive_batch(b=4, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 40, (b, 6)).astype(np.int32)
  ids[:, 4:] = 0  # padding
  return {"image": rng.integers(0, 255, (b, 16, 16, 3), dtype=np.uint8),
          "text": ids}


def classifier_batch(b=3, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 255, (b, 12, 12, 1), dtype=np.uint8),
          "audio": rng.integers(0, 255, (b, 16, 16, 1), dtype=np.uint8),
          "mask/image": np.array([True, True, False]),
          "mask/audio": np.array([True, False, True]),
          "label": np.arange(b, dtype=np.int32)}


def contrastive(remat="none", scan_layers=False, encoders=None):
  return build_contrastive(modalities=("image", "text"),
                           encoders=encoders or {"image": VIT, "text": BERT},
                           embed_dim=8, objective="sigmoid", remat=remat,
                           scan_layers=scan_layers)


def classifier(fusion, remat="none"):
  return build_classifier(modalities=("image", "audio"),
                          encoders={"image": LENET, "audio": LENET},
                          fusion=fusion, num_classes=3, head_hidden=(4,),
                          fusion_kwargs=TOKEN_FUSIONS[fusion], remat=remat)


def shapes(model, batch):
  """{path: shape} of the model's variables (nothing compiled)."""
  variables = jax.eval_shape(model.init, jax.random.key(0), batch)
  return {"/".join(k): v.shape for k, v in
          traverse_util.flatten_dict(variables).items()}


def sigmoid_loss(model, batch):
  """(params, batch_stats) -> SigLIP loss of the model in train mode, with
  dropout (the same key with and without remat)."""
  def loss(params, batch_stats):
    out, _ = model.apply({"params": params, "batch_stats": batch_stats},
                         batch, train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.key(1)})
    return losses.sigmoid_contrastive_loss(
        out["embedding/image"], out["embedding/text"], out["log_scale"],
        out["bias"])[0]
  return loss


def loss_and_grads(loss, variables):
  return jax.jit(jax.value_and_grad(loss))(variables["params"],
                                           variables.get("batch_stats", {}))


def remat_policies(jaxpr) -> list:
  """The policy of every rematerialised call in a jaxpr, nested ones too."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("checkpoint", "remat2", "remat"):
      found.append(eqn.params.get("policy"))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found.extend(remat_policies(inner))
  return found


def assert_close(a, b):
  """Loss and gradients of remat on and off: equal up to float rounding."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------ parameter trees ---


@pytest.mark.parametrize("policy", REMAT_POLICIES[1:])
def test_remat_keeps_the_contrastive_parameter_tree(policy):
  batch = contrastive_batch()
  assert shapes(contrastive(policy), batch) == shapes(contrastive(), batch)


@pytest.mark.parametrize("encoders", [{"image": AST}, {"image": FRAMES}],
                         ids=["ast", "frames"])
def test_remat_keeps_the_audio_and_video_parameter_trees(encoders):
  video = np.zeros((2, 3, 8, 8, 1), np.float32)
  spectrogram = np.zeros((2, 24, 24), np.float32)
  batch = {"image": video if "frames" in str(encoders) else spectrogram}
  build = functools.partial(build_contrastive, modalities=("image",),
                            encoders=encoders, embed_dim=8)
  assert shapes(build(remat="nothing_saveable"), batch) == shapes(build(),
                                                                  batch)


@pytest.mark.parametrize("fusion", sorted(TOKEN_FUSIONS))
def test_remat_keeps_the_token_fusion_parameter_trees(fusion):
  batch = classifier_batch()
  assert (shapes(classifier(fusion, "dots_saveable"), batch)
          == shapes(classifier(fusion), batch))


# -------------------------------------------------- losses and gradients ---


def test_vit_bert_loss_and_gradients_are_unchanged_by_remat():
  batch = contrastive_batch()
  variables = contract.random_params(contrastive(), batch)
  for policy in REMAT_POLICIES[1:]:  # traced only: what each one wraps
    jaxpr = jax.make_jaxpr(jax.grad(sigmoid_loss(contrastive(policy),
                                                 batch)))(
        variables["params"], {})
    # One rematerialised call per transformer block: 2 ViT + 2 BERT.
    policies = remat_policies(jaxpr.jaxpr)
    assert len(policies) == 4
    assert all(p is layers.checkpoint_policy(policy) for p in policies)
  assert not remat_policies(jax.make_jaxpr(jax.grad(sigmoid_loss(
      contrastive(), batch)))(variables["params"], {}).jaxpr)
  # Compiled (one block per tower, dropout in the text one, to compile
  # quickly): the same loss and gradients.
  shallow = {"image": dict(VIT, depth=1, dropout=0.0, pool="gap"),
             "text": dict(BERT, num_layers=1)}
  variables = contract.random_params(contrastive(encoders=shallow), batch)
  assert_close(
      loss_and_grads(sigmoid_loss(contrastive("nothing_saveable",
                                              encoders=shallow), batch),
                     variables),
      loss_and_grads(sigmoid_loss(contrastive(encoders=shallow), batch),
                     variables))


@pytest.mark.parametrize("fusion", ["cross_attention", "perceiver"])
def test_token_fusion_loss_and_gradients_are_unchanged_by_remat(fusion):
  # The fusion alone on tokens [B, N_m, D_m] (as the fusion contract calls
  # it), the first example missing its image; dropout on.
  tokens = contract.make_tokens(contract.TOKEN_SHAPES)
  masks = contract.make_masks()

  def make(policy):
    return FUSIONS[fusion](**TOKEN_FUSIONS[fusion], remat=policy)

  def loss(module):
    def fn(params, tokens):
      out = module.apply({"params": params}, tokens, masks, train=True,
                         rngs={"dropout": jax.random.key(1)})
      return jnp.mean(jnp.tanh(out))
    return fn

  params = contract.random_params(make("none"), tokens, masks)["params"]
  grad = lambda module: jax.jit(jax.value_and_grad(loss(module), (0, 1)))(
      params, tokens)
  rematted = make("nothing_saveable")
  assert remat_policies(jax.make_jaxpr(jax.grad(loss(rematted)))(
      params, tokens).jaxpr)
  assert_close(grad(rematted), grad(make("none")))


def test_remat_takes_train_as_a_static_argument_by_position_or_keyword():
  block = layers.remat(layers.TransformerBlock, "nothing_saveable")
  assert block.__name__ == "RematTransformerBlock"
  assert layers.remat(layers.TransformerBlock, "none") is (
      layers.TransformerBlock)
  module = block(num_heads=2, mlp_dim=8, dropout=0.5)
  x = contract.make_tokens({"x": (3, 4)})["x"]
  variables = module.init(jax.random.key(0), x)

  @jax.jit
  def outputs(variables, x):
    rngs = {"dropout": jax.random.key(1)}
    return (module.apply(variables, x, train=True, rngs=rngs),
            module.apply(variables, x, None, None, None, True, rngs=rngs),
            module.apply(variables, x))

  by_keyword, by_position, evaluated = outputs(variables, x)
  np.testing.assert_array_equal(by_keyword, by_position)
  assert not np.allclose(by_keyword, evaluated)  # dropout acted


def test_unknown_remat_policy_is_an_error():
  with pytest.raises(ValueError, match="unknown remat policy"):
    contrastive("save_only_these_names")
  config = configs.load_config("configs/avmnist.py")
  config.unlock()
  config.remat = "everything"
  with pytest.raises(UsageError, match="unknown remat 'everything'"):
    experiment.check_config(config)


# --------------------------------------------------------- scan_layers ---


def test_scan_layers_stacks_the_parameters_of_the_same_function():
  batch = contrastive_batch()
  unrolled = contrastive()
  variables = contract.random_params(unrolled, batch)
  scanned_shapes = shapes(contrastive(scan_layers=True), batch)
  assert "params/tower_image/encoder/blocks/mlp/dense_0/kernel" in (
      scanned_shapes)
  assert scanned_shapes[
      "params/tower_text/encoder/layers/attention/query/kernel"] == (
          2, 16, 2, 8)
  assert not any("block_0" in k or "layer_0" in k for k in scanned_shapes)

  # The unrolled parameters, stacked layer by layer, give the same outputs.
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  stacked = {}
  for prefix, name, depth in (("tower_image/encoder/", "block", 2),
                              ("tower_text/encoder/", "layer", 2)):
    scanned = prefix + {"block": "blocks", "layer": "layers"}[name]
    for key in [k for k in params if k.startswith(f"{prefix}{name}_0/")]:
      rest = key[len(f"{prefix}{name}_0"):]
      stacked[scanned + rest] = jnp.stack(
          [params.pop(f"{prefix}{name}_{i}{rest}") for i in range(depth)])
  params = traverse_util.unflatten_dict({**params, **stacked}, sep="/")
  scanned_params = {"/".join(("params",) + tuple(k.split("/"))): v.shape
                    for k, v in traverse_util.flatten_dict(
                        params, sep="/").items()}
  assert scanned_params == scanned_shapes

  apply = lambda model, p: model.apply({"params": p}, batch)
  for key in ("embedding/image", "embedding/text"):
    np.testing.assert_allclose(apply(contrastive(scan_layers=True),
                                     params)[key],
                               apply(unrolled, variables["params"])[key],
                               rtol=1e-5, atol=1e-6)


def test_scan_layers_with_remat_gives_the_same_gradients():
  # Scanned BERT layers (their padding mask passed to every layer) with
  # dropout; a small LeNet image tower keeps the compile short.
  batch = contrastive_batch()
  encoders = {"image": dict(LENET, final_pool=True), "text": BERT}
  scanned = contrastive(scan_layers=True, encoders=encoders)
  variables = contract.random_params(scanned, batch)
  plain = loss_and_grads(sigmoid_loss(scanned, batch), variables)
  rematted = contrastive("nothing_saveable", scan_layers=True,
                         encoders=encoders)
  assert remat_policies(jax.make_jaxpr(jax.grad(sigmoid_loss(
      rematted, batch)))(variables["params"], variables["batch_stats"]).jaxpr)
  assert_close(loss_and_grads(sigmoid_loss(rematted, batch), variables),
               plain)


def test_scan_layers_refuses_pretrained_weights_at_config_time():
  config = configs.load_config("configs/coco_mini.py")  # MiniLM text tower
  experiment.check_config(config)
  config.scan_layers = True
  with pytest.raises(UsageError, match="'scan_layers'.*'model.init'"):
    experiment.check_config(config)
