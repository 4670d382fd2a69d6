"""timm ViT checkpoints (mmjax.models.vit_checkpoints) against timm.

The fixture tests/data/timm_vit_tiny was written by timm's
VisionTransformer (tests/data/make_siglip_fixtures.py) with its
forward_features(x)[:, 0], so the parity check runs without torch.
"""

import json
import pathlib
import shutil

import flax
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mmjax import experiment
from mmjax.errors import UsageError
from mmjax.models import vit_checkpoints
from mmjax.models.encoders.vit import ViT

FIXTURE = pathlib.Path(__file__).parent / "data" / "timm_vit_tiny"


def features(path, pixels, **kwargs):
  vit_kwargs, params = vit_checkpoints.load_timm_vit(path, **kwargs)
  pre = vit_checkpoints.timm_preprocessing(path)
  x = (pixels / 255.0 - np.asarray(pre["mean"])) / np.asarray(pre["std"])
  out = ViT(**vit_kwargs).apply({"params": params}, x.astype(np.float32),
                                train=False)
  return vit_kwargs, np.asarray(out)[:, 0]


def test_class_token_features_match_timm():
  ref = np.load(FIXTURE / "reference.npz")
  kwargs, got = features(FIXTURE, ref["pixels"])
  assert kwargs == dict(width=32, depth=2, mlp_dim=64, num_heads=4,
                        patch_size=8, pool="cls", posemb="learn",
                        pre_norm=False, patch_bias=True, activation="gelu",
                        layer_norm_epsilon=1e-6)
  want = ref["features"].astype(np.float64)
  cosine = np.sum(got * want, -1) / (np.linalg.norm(got, axis=-1)
                                     * np.linalg.norm(want, axis=-1))
  diff = np.abs(got - want).max()
  assert diff < 1e-5 and cosine.min() > 1 - 1e-6, (diff, cosine.min())
  assert vit_checkpoints.timm_preprocessing(FIXTURE)["image_size"] == 32


def copy_fixture(tmp_path):
  directory = tmp_path / "vit"
  shutil.copytree(FIXTURE, directory)
  return directory


def test_a_bare_file_loads_with_num_heads_given(tmp_path):
  state = load_file(str(FIXTURE / "model.safetensors"))
  state["head.weight"] = np.zeros((10, 32), np.float32)  # dropped
  save_file(state, str(tmp_path / "vit.safetensors"))
  with pytest.raises(ValueError, match="pass num_heads"):
    vit_checkpoints.load_timm_vit(tmp_path / "vit.safetensors")
  _, params = vit_checkpoints.load_timm_vit(tmp_path / "vit.safetensors",
                                            num_heads=4)
  _, want = vit_checkpoints.load_timm_vit(FIXTURE)
  np.testing.assert_array_equal(params["block_1"]["attention"]["query"][
      "kernel"], want["block_1"]["attention"]["query"]["kernel"])


def test_checkpoint_that_does_not_fit_names_the_first_parameter(tmp_path):
  directory = copy_fixture(tmp_path)
  state = load_file(str(directory / "model.safetensors"))
  state["blocks.1.mlp.fc2.weight"] = np.zeros((32, 48), np.float32)
  save_file(state, str(directory / "model.safetensors"))
  with pytest.raises(ValueError, match=r"block_1/mlp/dense_1/kernel: "
                     r"expected shape \(64, 32\), got \(48, 32\)"):
    vit_checkpoints.load_timm_vit(directory)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model_args"].update(global_pool="avg"),
     "model_args.global_pool='avg' is not supported"),
    (lambda c: c["model_args"].update(init_values=1e-5),
     "model_args.init_values=1e-05 is not supported"),
])
def test_what_vit_lacks_is_refused(tmp_path, edit, message):
  directory = copy_fixture(tmp_path)
  raw = json.loads((directory / "config.json").read_text())
  edit(raw)
  (directory / "config.json").write_text(json.dumps(raw))
  with pytest.raises(ValueError, match=message):
    vit_checkpoints.load_timm_vit(directory)


def test_layer_scale_tensors_are_refused(tmp_path):
  state = load_file(str(FIXTURE / "model.safetensors"))
  state["blocks.0.ls1.gamma"] = np.ones((32,), np.float32)
  save_file(state, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"'blocks.0.ls1.gamma': layer scale"):
    vit_checkpoints.load_timm_vit(tmp_path, num_heads=4)


# --------------------------------------------------------- big_vision .npz ---
#
# Parity with big_vision's own model code: tests/test_big_vision_checkpoints.py.


def test_augreg_names_load_as_timm_converts_them(tmp_path):
  """An AugReg-style (pre-Linen names, posembed_input with the class
  token's row, a head) npz of the timm fixture's weights."""
  _, params = vit_checkpoints.load_timm_vit(FIXTURE)
  flat = {"embedding/kernel": params["embedding"]["kernel"],
          "embedding/bias": params["embedding"]["bias"],
          "cls": params["cls"],
          "Transformer/posembed_input/pos_embedding": params["pos_embedding"],
          "head/kernel": np.zeros((32, 10), np.float32),
          "head/bias": np.zeros((10,), np.float32)}
  old = {"norm_attention": "LayerNorm_0",
         "attention": "MultiHeadDotProductAttention_1",
         "norm_mlp": "LayerNorm_2", "mlp": "MlpBlock_3"}
  for i in range(2):
    for ours, theirs in old.items():
      for path, leaf in jax.tree_util.tree_flatten_with_path(
          params[f"block_{i}"][ours])[0]:
        name = "/".join(k.key for k in path)
        if ours == "mlp":
          name = name.replace("dense_", "Dense_")
        flat[f"Transformer/encoderblock_{i}/{theirs}/{name}"] = leaf
  flat["Transformer/encoder_norm/scale"] = params["encoder_norm"]["scale"]
  flat["Transformer/encoder_norm/bias"] = params["encoder_norm"]["bias"]
  np.savez(tmp_path / "augreg.npz", **flat)
  kwargs, loaded = vit_checkpoints.load_big_vision_vit(tmp_path / "augreg.npz")
  assert (kwargs["pool"], kwargs["activation"]) == ("cls", "gelu_tanh")
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  # The newer layout: the patches' embedding alone, added before "cls".
  del flat["Transformer/posembed_input/pos_embedding"]
  flat["pos_embedding"] = params["pos_embedding"][:, 1:]
  np.savez(tmp_path / "new.npz", **flat)
  _, loaded = vit_checkpoints.load_big_vision_vit(tmp_path / "new.npz")
  np.testing.assert_array_equal(loaded["pos_embedding"][:, 0], 0)
  np.testing.assert_array_equal(loaded["pos_embedding"][:, 1:],
                                params["pos_embedding"][:, 1:])


class Holder(flax.struct.PyTreeNode):
  params: dict


def test_model_init_vit_loads_an_encoder_subtree(tmp_path):
  kwargs, loaded = vit_checkpoints.load_vit(FIXTURE)
  params = {"tower_image": {"encoder": ViT(**kwargs).init(
      jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
      train=False)["params"]}}
  state = experiment.load_pretrained(
      Holder(params), {"tower_image/encoder": f"vit:{FIXTURE}"})
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(state.params["tower_image"]["encoder"]), loaded)
  with pytest.raises(UsageError, match="model.init.tower_image/encoder"):
    experiment.load_pretrained(
        Holder(params), {"tower_image/encoder": f"vit:{tmp_path}"})


def test_position_embedding_is_resampled_for_another_image_size():
  # A linear ramp over the grid stays a ramp under bilinear resampling,
  # corners on corners; the class token's row is kept.
  side, width = 4, 3
  yy, xx = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
  ramp = np.stack([yy, xx, yy + 2 * xx], -1).reshape(1, side * side, width)
  posemb = np.concatenate([np.full((1, 1, width), 7.0), ramp], 1)
  out = vit_checkpoints.resample_posemb(posemb.astype(np.float32), 1 + 7 * 7)
  assert out.shape == (1, 50, width) and out.dtype == np.float32
  np.testing.assert_array_equal(out[0, 0], posemb[0, 0])
  t = np.linspace(0, side - 1, 7)
  yy, xx = np.meshgrid(t, t, indexing="ij")
  np.testing.assert_allclose(
      out[0, 1:], np.stack([yy, xx, yy + 2 * xx], -1).reshape(49, width),
      atol=1e-5)
  np.testing.assert_array_equal(
      vit_checkpoints.resample_posemb(posemb, posemb.shape[1]), posemb)
  with pytest.raises(ValueError, match="cannot resample 17 positions to 12"):
    vit_checkpoints.resample_posemb(posemb, 12)


def test_model_init_vit_at_another_image_size_resamples_positions():
  kwargs, loaded = vit_checkpoints.load_vit(FIXTURE)  # 32 px: 4x4 patches
  params = {"tower_image": {"encoder": ViT(**kwargs).init(
      jax.random.key(0), np.zeros((1, 48, 48, 3), np.float32),
      train=False)["params"]}}
  state = experiment.load_pretrained(
      Holder(params), {"tower_image/encoder": f"vit:{FIXTURE}"})
  got = jax.device_get(state.params["tower_image"]["encoder"])
  assert got["pos_embedding"].shape == (1, 1 + 6 * 6, 32)
  np.testing.assert_array_equal(
      got["pos_embedding"],
      vit_checkpoints.resample_posemb(loaded["pos_embedding"], 37))
  rest = lambda tree: {k: v for k, v in tree.items() if k != "pos_embedding"}
  jax.tree.map(np.testing.assert_array_equal, rest(got), rest(loaded))
