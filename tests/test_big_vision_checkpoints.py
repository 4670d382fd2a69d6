"""big_vision .npz checkpoints against big_vision's own model code.

The fixtures tests/data/big_vision_siglip_tiny (a SigLIP two-tower:
proj.image_text.two_towers with a "vit" image tower, pool_type "map", and
text_transformer, pool_type "last") and tests/data/big_vision_vit_tiny (an
AugReg-style vit.Model, pool_type "tok", a classifier head) were
initialised, saved as .npz (per-layer and scan=True layouts) and run by
big_vision itself, commit 0127fb6 (tests/data/make_big_vision_fixtures.py);
mmjax reads them through its public loaders (`siglip.load_siglip`,
`vit_checkpoints.load_big_vision_vit`) and `model.init` entries
("siglip:PATH", "vit:PATH") and must give big_vision's outputs. Neither
big_vision nor torch is needed here.
"""

import pathlib
import shutil

import flax
import jax
import numpy as np
import pytest

from mmjax import experiment
from mmjax.models import siglip, vit_checkpoints
from mmjax.models.encoders.vit import ViT

DATA = pathlib.Path(__file__).parent / "data"
SIGLIP = DATA / "big_vision_siglip_tiny"
VIT = DATA / "big_vision_vit_tiny"
LAYOUTS = [("", "per-layer"), ("_scan", "scan")]


def parity(got, want):
  """(max abs difference, min cosine) of rows, in float64."""
  got = np.asarray(got, np.float64).reshape(np.shape(want))
  want = np.asarray(want, np.float64)
  cosine = np.sum(got * want, -1) / (np.linalg.norm(got, axis=-1)
                                     * np.linalg.norm(want, axis=-1))
  return np.abs(got - want).max(), cosine.min()


def check(what, got, want):
  diff, cosine = parity(got, want)
  message = f"{what}: max abs diff {diff:.2e}, min cosine 1 - {1 - cosine:.1e}"
  print(message)
  assert diff < 1e-5 and cosine > 1 - 1e-6, message


def pixels(images):
  """uint8 -> [-1, 1], big_vision's value_range(-1, 1) (as the fixture)."""
  return ((images.astype(np.float32) / 255.0 - np.float32(0.5))
          / np.float32(0.5))


def vit_features(kwargs, params, x):
  """ViT(**kwargs)'s output [B, D] (its one pooled token)."""
  apply = jax.jit(lambda p, x: ViT(**kwargs).apply({"params": p}, x,
                                                   train=False)[:, 0])
  return apply(params, x)


class Holder(flax.struct.PyTreeNode):
  """A train state's stand-in for `experiment.load_pretrained`."""
  params: dict


def zeros_like(params):
  """A fresh tree of device arrays for `load_pretrained` to fill."""
  return jax.tree.map(lambda a: jax.numpy.zeros(np.shape(a), a.dtype), params)


@pytest.mark.parametrize("suffix, layout", LAYOUTS, ids=[l for _, l in LAYOUTS])
def test_siglip_matches_big_vision_two_towers(tmp_path, suffix, layout):
  path = SIGLIP / f"siglip{suffix}.npz"
  ref = np.load(SIGLIP / "reference.npz")
  config, params = siglip.load_siglip(path)
  shutil.copy(path, tmp_path)  # a directory holding one .npz is the same
  assert siglip.siglip_config(tmp_path) == config
  model = config["model"]
  image, text = model["encoders"]["image"], model["encoders"]["text"]
  assert (config["image_size"], config["max_length"]) == (32, 16)
  assert (image["width"], image["depth"], image["num_heads"],
          image["patch_size"], image["pool"]) == (32, 2, 4, 8, "map")
  assert (text["width"], text["num_layers"], text["num_heads"],
          text["vocab_size"], text["pool"]) == (24, 2, 3, 100, "last")
  assert model["projections"] == {"image": "none", "text": "dense"}
  assert model["embed_dim"] == 32 and model["objective"] == "sigmoid"

  # The same weights through config.model.init "siglip:PATH".
  name = f"siglip:{path}"
  state = experiment.load_pretrained(Holder(zeros_like(params)), {
      "tower_image": name, "tower_text": name, "log_scale": name,
      "bias": name})
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(state.params), params)

  out = jax.jit(siglip.build_siglip(config).apply)(
      {"params": params}, {"image": ref["pixels"], "text": ref["ids"]})
  prefix = "scan_" if suffix else ""
  for modality in ("image", "text"):
    check(f"SigLIP {layout} {modality} embeddings",
          out[f"embedding/{modality}"], ref[f"{prefix}{modality}_embeds"])
  np.testing.assert_array_equal(out["log_scale"], ref["t"])
  np.testing.assert_array_equal(out["bias"], ref["b"])


def test_siglip_image_tower_as_a_vit_matches_big_vision():
  """"vit:PATH" of a two-tower .npz: its image tower ("params/img")."""
  ref = np.load(SIGLIP / "reference.npz")
  kwargs, params = vit_checkpoints.load_vit(SIGLIP / "siglip.npz")
  assert (kwargs["pool"], kwargs["num_heads"], kwargs["activation"]) == (
      "map", 4, "gelu_tanh")
  check("SigLIP image tower (ViT) features",
        vit_features(kwargs, params, pixels(ref["pixels"])),
        ref["image_features"])


@pytest.mark.parametrize("suffix, layout", LAYOUTS, ids=[l for _, l in LAYOUTS])
def test_vit_matches_big_vision_vit(suffix, layout):
  path = VIT / f"vit{suffix}.npz"
  ref = np.load(VIT / "reference.npz")
  kwargs, params = vit_checkpoints.load_big_vision_vit(path)
  assert kwargs == dict(width=32, depth=2, mlp_dim=64, num_heads=4,
                        patch_size=8, pool="cls", posemb="learn",
                        pre_norm=False, patch_bias=True,
                        activation="gelu_tanh", layer_norm_epsilon=1e-6)
  # big_vision adds pos_embedding [1, 16, D] before the class token: the
  # class token's row is zero.
  np.testing.assert_array_equal(params["pos_embedding"][:, 0], 0)
  x = pixels(ref["pixels"])
  state = experiment.load_pretrained(
      Holder({"tower_image": {"encoder": zeros_like(params)}}),
      {"tower_image/encoder": f"vit:{path}"})
  loaded = jax.device_get(state.params["tower_image"]["encoder"])
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  features = np.asarray(vit_features(kwargs, loaded, x))
  check(f"ViT {layout} features (class token)", features,
        ref[f"{'scan_' if suffix else ''}features"])
  # They are what big_vision's classifier head reads (dropped by mmjax).
  with np.load(path) as flat:
    logits = features @ flat["params/head/kernel"] + flat["params/head/bias"]
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-5)


@pytest.mark.parametrize("load, name", [
    (lambda p: siglip.load_siglip(p)[1], SIGLIP / "siglip"),
    (lambda p: vit_checkpoints.load_big_vision_vit(p)[1], VIT / "vit")],
    ids=["siglip", "vit"])
def test_scan_and_per_layer_layouts_load_the_same_tree(load, name):
  jax.tree.map(np.testing.assert_array_equal,
               load(name.with_suffix(".npz")),
               load(name.with_name(name.name + "_scan.npz")))
