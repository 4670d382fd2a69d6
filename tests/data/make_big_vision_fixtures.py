"""Writes the tiny big_vision checkpoints of tests/data with big_vision's own
model code (github.com/google-research/big_vision, commit 0127fb6):

  git -C <big_vision clone> archive 0127fb6 | tar -x -C /tmp/big_vision_src
  python tests/data/make_big_vision_fixtures.py /tmp/big_vision_src

big_vision is not pip-installable: its directory goes on sys.path. Needs
only what mmjax already needs (jax, flax, numpy, scipy, absl, einops,
ml_collections); torch and TensorFlow are not used. Nothing is downloaded.

big_vision/utils.py does `import tensorflow.io.gfile as gfile` at import
time, and TensorFlow is not (and must not be) installed. The models used
here touch gfile only to read remote files, so, while big_vision's modules
are imported, `_gfile_stand_in` puts a minimal module under the names
"tensorflow", "tensorflow.io" and "tensorflow.io.gfile" into sys.modules
(open(), os.path.exists, ... for local paths) and removes it again
afterwards. flax.training.checkpoints is imported before that, since
flax.io probes for TensorFlow with importlib.util.find_spec, which a module
without a __spec__ breaks (and flax should keep its own native gfile). No
big_vision API needed a shim for jax 0.10 / flax 0.12.

Models (big_vision's modules and factories, tiny configs), randomly
initialised by their own `init`, then every parameter gets Gaussian noise
(std 0.05, numpy seed 0 / 1) so that biases, LayerNorm scales and biases,
the MAP probe, the class token, the temperature and the bias are all
non-trivial:

  big_vision_siglip_tiny/  proj.image_text.two_towers.Model as the SigLIP
      checkpoints configure it: image_model "vit" (width 32, depth 2,
      mlp_dim 64, 4 heads, patch 8 on 32x32 images, posemb "learn",
      pool_type "map"), text_model "proj.image_text.text_transformer"
      (width 24, depth 2, mlp_dim 48, 3 heads, vocab 100, 16 positions,
      pool_type "last"), out_dim (None, 32) (no image head, text head to
      32), temperature_init 10, bias_init -10.
      siglip.npz       the per-layer model's params ("encoderblock_<i>").
      siglip_scan.npz  the same weights in the layout of the scan=True
                       model (both towers; one stacked "encoderblock"),
                       converted by big_vision's vit.pyloop_to_scan.
  big_vision_vit_tiny/  vit.Model (AugReg style: width 32, depth 2,
      mlp_dim 64, 4 heads, patch 8 on 32x32 images, posemb "learn",
      pool_type "tok" (class token), rep_size False, num_classes 10).
      vit.npz, vit_scan.npz  as above.

Checkpoints are written as big_vision writes .npz checkpoints:
utils.tree_flatten_with_names({"params": params}) -> np.savez, names
joined with "/" ("params/img/MAPHead_0/probe", "params/t", ...); each is
read back with big_vision's own loaders (two_towers.load / vit.load, i.e.
utils.load_params, fix_old_checkpoints, merge_params against a fresh init
of the model) and the references are computed from what was read back.

reference.npz (float32 unless said), inputs as big_vision's SigLIP and ViT
pipelines give them: coco_mini images (data/coco_mini, CC BY / CC BY-SA)
subsampled 64 -> 32 px, value_range(-1, 1) = (x / 255 - 0.5) / 0.5:

  siglip: "pixels" uint8 [4, 32, 32, 3]; "ids" int32 [6, 16] (random ids in
      [0, 100), some rows padded with 1, big_vision's pad and sticky end
      id); "image_embeds" [4, 32], "text_embeds" [6, 32] (two_towers'
      zimg, ztxt: L2-normalised); "image_features" [4, 32] (the image
      tower's output before normalisation, out["img/pre_logits"]);
      "scan_image_embeds", "scan_text_embeds" (the scan model's, from
      siglip_scan.npz); "t", "b" (the parameters: log temperature, bias).
  vit: "pixels" uint8 [4, 32, 32, 3]; "features" [4, 32] (out["head_input"]:
      the class token after the final LayerNorm, what mmjax's ViT gives);
      "logits" [4, 10]; "scan_features" (the scan model's).

tests/test_big_vision_checkpoints.py checks mmjax against them without
big_vision.
"""

import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import types

import numpy as np

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent.parent
BIG_VISION_COMMIT = "0127fb6"
NOISE = 0.05


@contextlib.contextmanager
def _gfile_stand_in():
  """A minimal `tensorflow.io.gfile` in sys.modules (module docstring)."""
  import flax.training.checkpoints  # pylint: disable=import-outside-toplevel,unused-import
  gfile = types.ModuleType("tensorflow.io.gfile")
  gfile.GFile = open
  gfile.exists = os.path.exists
  gfile.isdir = os.path.isdir
  gfile.listdir = os.listdir
  gfile.makedirs = lambda path: os.makedirs(path, exist_ok=True)
  gfile.remove = os.remove
  gfile.rename = lambda src, dst, overwrite=False: os.replace(src, dst)
  gfile.copy = lambda src, dst, overwrite=False: shutil.copy(src, dst)
  gfile.glob = lambda pattern: sorted(__import__("glob").glob(pattern))
  tf_io = types.ModuleType("tensorflow.io")
  tf_io.gfile = gfile
  tf = types.ModuleType("tensorflow")
  tf.io = tf_io
  names = {"tensorflow": tf, "tensorflow.io": tf_io,
           "tensorflow.io.gfile": gfile}
  if any(n in sys.modules for n in names):
    raise RuntimeError("tensorflow is already imported")
  sys.modules.update(names)
  try:
    yield
  finally:
    for name in names:
      del sys.modules[name]


def import_big_vision(tree: pathlib.Path):
  """big_vision's (utils, vit, two_towers) from the work tree `tree`."""
  if not (tree / "big_vision" / "models" / "vit.py").is_file():
    raise SystemExit(f"{tree} is not a big_vision work tree "
                     "(no big_vision/models/vit.py)")
  try:
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout
    if not head.startswith(BIG_VISION_COMMIT):
      print(f"warning: {tree} is at {head.strip()}, the fixtures were made "
            f"at {BIG_VISION_COMMIT}", file=sys.stderr)
  except (OSError, subprocess.CalledProcessError):
    pass  # an archive without .git
  sys.path.insert(0, str(tree))
  with _gfile_stand_in():
    # pylint: disable=import-outside-toplevel,import-error
    from big_vision import utils
    from big_vision.models import vit
    from big_vision.models.proj.image_text import text_transformer  # pylint: disable=unused-import
    from big_vision.models.proj.image_text import two_towers
  return utils, vit, two_towers


def perturb(params, seed):
  """Every leaf + N(0, NOISE^2), in tree_flatten order."""
  import jax  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([
      (np.asarray(a) + NOISE * rng.standard_normal(np.shape(a))).astype(
          np.float32) for a in leaves])


def save_npz(utils, path: pathlib.Path, params):
  """As big_vision writes an .npz checkpoint: names joined with "/"."""
  import jax  # pylint: disable=import-outside-toplevel
  names_and_vals, _ = utils.tree_flatten_with_names(
      {"params": jax.device_get(params)})
  with open(path, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in names_and_vals})


def images(start):
  pixels = np.load(ROOT / "data/coco_mini/images.npz")["images"][
      start:start + 4]
  pixels = np.ascontiguousarray(pixels[:, ::2, ::2])  # 64 -> 32 px
  # big_vision's value_range(-1, 1); mmjax's PixelNormalize(0.5, 0.5).
  x = (pixels.astype(np.float32) / 255.0 - np.float32(0.5)) / np.float32(0.5)
  return pixels, x


def same_structure(a, b, what):
  import jax  # pylint: disable=import-outside-toplevel
  shapes = lambda t: jax.tree.map(np.shape, t)
  if shapes(a) != shapes(b):
    raise AssertionError(f"{what}: the converted tree is not the model's")


def write_siglip(utils, vit, two_towers, directory: pathlib.Path):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel

  def config(scan):
    cfg = ml_collections.ConfigDict()
    cfg.image_model = "vit"
    cfg.text_model = "proj.image_text.text_transformer"
    cfg.image = dict(width=32, depth=2, mlp_dim=64, num_heads=4,
                     patch_size=(8, 8), posemb="learn", pool_type="map",
                     scan=scan)
    cfg.text = dict(width=24, depth=2, mlp_dim=48, num_heads=3,
                    vocab_size=100, pool_type="last", scan=scan)
    cfg.out_dim = (None, 32)
    cfg.temperature_init = 10.0
    cfg.bias_init = -10.0
    return cfg

  def model(cfg):
    return two_towers.Model(**cfg)

  pixels, x = images(0)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 100, (6, 16)).astype(np.int32)
  ids[0, :3] = 0  # id 0 is an ordinary token: no mask
  ids[1, 5:], ids[2, 12:], ids[4, 1:], ids[5, -1] = 1, 1, 1, 1

  outputs = {}
  for scan in (False, True):
    cfg = config(scan)
    init = model(cfg).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                           jnp.zeros((1, 16), jnp.int32))["params"]
    name = "siglip_scan.npz" if scan else "siglip.npz"
    if not scan:
      params = perturb(init, 0)
    else:  # siglip.npz's weights in the scan model's layout
      loop = two_towers.load(None, str(directory / "siglip.npz"),
                             config(False))
      img = vit.pyloop_to_scan(loop["img"])
      txt = dict(loop["txt"])
      txt["Encoder_0"] = vit.pyloop_to_scan(
          {"Transformer": txt["Encoder_0"]})["Transformer"]
      params = {**loop, "img": img, "txt": txt}
      same_structure(params, init, "scan")
    save_npz(utils, directory / name, params)
    restored = two_towers.load(init, str(directory / name), cfg)
    same_structure(restored, init, name)
    zimg, ztxt, out = model(cfg).apply({"params": restored}, x, ids)
    outputs[scan] = (np.asarray(zimg), np.asarray(ztxt),
                     np.asarray(out["img/pre_logits"]), restored)
  (zimg, ztxt, features, restored), (simg, stxt, _, _) = (outputs[False],
                                                          outputs[True])
  np.testing.assert_allclose(simg, zimg, atol=1e-5)
  np.testing.assert_allclose(stxt, ztxt, atol=1e-5)
  np.savez(directory / "reference.npz", pixels=pixels, ids=ids,
           image_embeds=zimg, text_embeds=ztxt, image_features=features,
           scan_image_embeds=simg, scan_text_embeds=stxt,
           t=np.asarray(restored["t"], np.float32).reshape(()),
           b=np.asarray(restored["b"], np.float32).reshape(()))


def write_vit(utils, vit, directory: pathlib.Path):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel

  def config(scan):
    return ml_collections.ConfigDict(dict(
        num_classes=10, width=32, depth=2, mlp_dim=64, num_heads=4,
        patch_size=(8, 8), posemb="learn", pool_type="tok", rep_size=False,
        scan=scan))

  pixels, x = images(4)
  outputs = {}
  for scan in (False, True):
    cfg = config(scan)
    model = vit.Model(**cfg)
    init = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))["params"]
    name = "vit_scan.npz" if scan else "vit.npz"
    if not scan:
      params = perturb(init, 1)
    else:
      params = vit.pyloop_to_scan(vit.load(None, str(directory / "vit.npz"),
                                           config(False)))
      same_structure(params, init, "scan")
    save_npz(utils, directory / name, params)
    restored = vit.load(init, str(directory / name), cfg)
    same_structure(restored, init, name)
    logits, out = model.apply({"params": restored}, x)
    outputs[scan] = (np.asarray(out["head_input"]), np.asarray(logits))
  (features, logits), (scan_features, _) = outputs[False], outputs[True]
  np.testing.assert_allclose(scan_features, features, atol=1e-5)
  np.savez(directory / "reference.npz", pixels=pixels, features=features,
           logits=logits, scan_features=scan_features)


PROVENANCE = """\
Made by big_vision's own model code (github.com/google-research/big_vision,
commit {commit}), run locally, nothing downloaded:

  git -C <big_vision clone> archive {commit} | tar -x -C /tmp/big_vision_src
  python tests/data/make_big_vision_fixtures.py /tmp/big_vision_src

{what}
reference.npz: big_vision's outputs for the checkpoints as its loaders read
them back. See tests/data/make_big_vision_fixtures.py for the configs and
keys; tests/test_big_vision_checkpoints.py checks mmjax against them.
"""


def main():
  if len(sys.argv) != 2:
    raise SystemExit(__doc__.split("\n\n")[1])
  utils, vit, two_towers = import_big_vision(pathlib.Path(sys.argv[1]))
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_platforms", "cpu")  # float32 references on CPU
  for name, what, write in (
      ("big_vision_siglip_tiny",
       "siglip.npz, siglip_scan.npz: proj.image_text.two_towers.Model (vit, "
       "pool_type map;\ntext_transformer, pool_type last), per-layer and scan "
       "layouts, random weights.",
       lambda d: write_siglip(utils, vit, two_towers, d)),
      ("big_vision_vit_tiny",
       "vit.npz, vit_scan.npz: vit.Model (pool_type tok, num_classes 10), "
       "per-layer and\nscan layouts, random weights.",
       lambda d: write_vit(utils, vit, d))):
    directory = HERE / name
    directory.mkdir(exist_ok=True)
    write(directory)
    (directory / "PROVENANCE").write_text(PROVENANCE.format(
        commit=BIG_VISION_COMMIT, what=what))
    print("wrote", directory)


if __name__ == "__main__":
  main()
