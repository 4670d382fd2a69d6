"""The contract every fusion keeps, tested once for each fusion.

Every entry of `mmjax.models.fusion.FUSIONS`, plus `custom_fusion:GatedSum`
(tests/custom_fusion.py, a fusion outside the package chosen by import string
through `mmjax.registry.lookup`), is called as

  fusion(tokens: {m: [B, N_m, D_m]}, masks: {m: [B]} bool, train=...)

and must give a finite float32 [B, D] ([B, num_classes] for a fusion with
`returns_logits`), pass gradients to the tokens of every modality it uses,
ignore the tokens of masked rows (and of modalities it does not use), and stay
finite, independent of the tokens, when every modality is masked. A fusion with
`takes_inputs` (early) gets low-level inputs [B, H_m, W_m] instead of tokens;
a unimodal baseline uses one modality only.

The per-fusion files (test_fusion_*.py) hold what is specific to each fusion:
NumPy references of the papers' equations and structural checks. They share
`make_tokens` and `random_params` from here.
"""

import dataclasses
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import registry
from mmjax.models.fusion import FUSIONS

TESTS_DIR = str(pathlib.Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:  # for the import string 'custom_fusion:...'
  sys.path.insert(0, TESTS_DIR)

B = 3
TOKEN_SHAPES = {"audio": (3, 5), "image": (4, 6)}  # name -> (N_m, D_m)
INPUT_SHAPES = {"audio": (4, 6), "image": (8, 8)}  # early fusion: (H_m, W_m)
MASKS = {"audio": [True, False, True], "image": [True, True, False]}
NUM_CLASSES = 3
CUSTOM = "custom_fusion:GatedSum"


def make_tokens(shapes, batch=B, seed=0):
  """{m: float32 N(0, 1) [batch, *shapes[m]]}, drawn by NumPy."""
  rng = np.random.default_rng(seed)
  return {m: jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
          for m, shape in shapes.items()}


def random_params(module, *args, seed=0):
  """Random variables with the module's structure, drawn by NumPy.

  Parameters are 0.3 N(0, 1), LayerNorm scales 1 + 0.3 N(0, 1), so zero
  biases, zero gates and unit scales are not all that is exercised; batch
  statistics are mean 0, variance 1; sown intermediates are left out. The
  shapes come from `jax.eval_shape(module.init, ...)`, which compiles nothing
  (the tests stay fast on 2 CPUs).
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
  shapes = {k: v for k, v in shapes.items() if k != "intermediates"}
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    collection, name = path[0].key, path[-1].key
    if collection != "params":
      return jnp.full(leaf.shape, float(name == "var"), leaf.dtype)
    noise = 0.3 * rng.normal(size=leaf.shape).astype(np.float32)
    return jnp.asarray(noise + (name == "scale"))

  return jax.tree_util.tree_map_with_path(draw, shapes)


@dataclasses.dataclass(frozen=True)
class Case:
  """One fusion configuration: small keyword arguments and what to expect."""
  name: str  # a FUSIONS key or an import string
  kwargs: dict = dataclasses.field(default_factory=dict)
  width: int | None = None  # the output's last axis; None: not checked
  zero_when_all_masked: bool = False


ATTENTION = dict(dim=8, num_heads=2, mlp_dim=16)
CASES = {  # case id -> case
    "image_only": Case("image_only", width=6, zero_when_all_masked=True),
    "audio_only": Case("audio_only", width=5, zero_when_all_masked=True),
    "early": Case("early", dict(encoder=dict(name="lenet", features=4,
                                             extra_layers=0)), width=4),
    "concat": Case("concat", width=5 + 6, zero_when_all_masked=True),
    "late": Case("late", dict(hidden=(4,)), width=NUM_CLASSES,
                 zero_when_all_masked=True),
    "weighted": Case("weighted", dict(dim=8), width=8,
                     zero_when_all_masked=True),
    "hybrid": Case("hybrid", dict(hidden=(4,)), width=NUM_CLASSES),
    "tensor": Case("tensor", dict(dim=3), width=4 * 4),
    "tensor-out_dim": Case("tensor", dict(dim=3, out_dim=7), width=7),
    "low_rank_tensor": Case("low_rank_tensor", dict(rank=2, out_dim=8),
                            width=8),
    "cross_attention": Case("cross_attention", ATTENTION, width=2 * 8,
                            zero_when_all_masked=True),
    "coattention": Case("coattention", dict(ATTENTION, layers="C"),
                        width=2 * 8, zero_when_all_masked=True),
    "mult": Case("mult", dict(ATTENTION, self_layers=0),  # M (M - 1) dim
                 width=2 * 1 * 8, zero_when_all_masked=True),
    "perceiver": Case("perceiver", dict(dim=8, num_latents=4, num_layers=1,
                                        num_heads=2), width=8),
    "bottleneck": Case("bottleneck", dict(dim=8, num_layers=1, fusion_layer=0,
                                          num_bottlenecks=2, num_heads=2),
                       width=8),
    CUSTOM: Case(CUSTOM, dict(dim=8), width=8, zero_when_all_masked=True),
}
# Every registered fusion is tested, with its defaults if it has no case yet.
CASE_IDS = sorted(set(FUSIONS) | set(CASES))


def case_of(case_id):
  return CASES.get(case_id, Case(case_id))


@dataclasses.dataclass
class Setup:
  module: object
  case: Case
  shapes: dict  # name -> the per-example shape of what the fusion is given
  used: list  # the modalities the output may depend on
  run: object  # (x, masks) -> (output, d sum(output**2) / dx), jitted


@functools.cache
def setup(case_id) -> Setup:
  """Builds a case's module and one compilation that serves every check."""
  case = case_of(case_id)
  cls = registry.lookup("model.fusion", case.name, FUSIONS)
  target = getattr(cls, "func", cls)  # image_only etc. are partials
  kwargs = dict(case.kwargs)
  if getattr(target, "returns_logits", False):
    kwargs.setdefault("num_classes", NUM_CLASSES)
  module = cls(**kwargs)
  shapes = (INPUT_SHAPES if getattr(module, "takes_inputs", False)
            else TOKEN_SHAPES)
  modality = getattr(module, "modality", None)
  used = [modality] if modality else sorted(shapes)
  variables = random_params(module, make_tokens(shapes), make_masks())

  @jax.jit
  def run(x, masks):
    def loss(x):
      out = module.apply(variables, x, masks)
      return jnp.sum(out**2), out
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(x)
    return out, grads

  return Setup(module, case, shapes, used, run)


def make_masks(pattern=None):
  pattern = MASKS if pattern is None else pattern
  return {m: jnp.asarray(pattern[m], bool) for m in TOKEN_SHAPES}


def forward(s, x, masks):
  return np.asarray(s.run(x, masks)[0])


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_output_shape(case_id):
  s = setup(case_id)
  out = forward(s, make_tokens(s.shapes), make_masks())
  assert out.ndim == 2 and out.shape[0] == B
  if s.case.width is not None:
    assert out.shape[1] == s.case.width
  if getattr(s.module, "returns_logits", False):
    assert out.shape[1] == NUM_CLASSES
  assert out.dtype == np.float32
  assert np.all(np.isfinite(out))


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_train_mode_output_shape(case_id):
  # Traced only (nothing compiled): train=True with a dropout rng, every
  # collection mutable (batch statistics, intermediates).
  s = setup(case_id)
  x, masks = make_tokens(s.shapes), make_masks()
  variables = random_params(s.module, x, masks)
  out, _ = jax.eval_shape(lambda v: s.module.apply(
      v, x, masks, train=True, rngs={"dropout": jax.random.key(1)},
      mutable=True), variables)
  eval_out = jax.eval_shape(lambda v: s.module.apply(v, x, masks), variables)
  assert out.shape == eval_out.shape and out.dtype == eval_out.dtype


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_gradients_reach_the_used_modalities(case_id):
  s = setup(case_id)
  present = make_masks({m: [True] * B for m in TOKEN_SHAPES})
  _, grads = s.run(make_tokens(s.shapes), present)
  for m in s.shapes:
    grad = np.asarray(grads[m])
    assert np.all(np.isfinite(grad)), m
    if m in s.used:
      assert np.abs(grad).sum() > 0, m
    else:
      np.testing.assert_array_equal(grad, 0, err_msg=m)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_masked_modality_changes_nothing(case_id):
  s = setup(case_id)
  x, masks = make_tokens(s.shapes), make_masks()
  base = forward(s, x, masks)
  for i, m in enumerate(sorted(s.shapes)):
    noise = 100 * make_tokens({m: s.shapes[m]}, seed=10 + i)[m]
    missing = ~masks[m].reshape((B,) + (1,) * len(s.shapes[m]))
    changed = dict(x, **{m: jnp.where(missing, noise, x[m])})
    assert not np.array_equal(changed[m], x[m])
    np.testing.assert_array_equal(forward(s, changed, masks), base,
                                  err_msg=m)
    # The same change on the present rows moves the output, if m is used.
    changed = dict(x, **{m: jnp.where(missing, x[m], noise)})
    if m in s.used:
      assert not np.allclose(forward(s, changed, masks), base), m
    else:
      np.testing.assert_array_equal(forward(s, changed, masks), base,
                                    err_msg=m)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_all_masked_is_finite_and_ignores_the_tokens(case_id):
  s = setup(case_id)
  x = make_tokens(s.shapes)
  masks = make_masks({m: [False] * B for m in TOKEN_SHAPES})
  out = forward(s, x, masks)
  assert out.shape[0] == B and np.all(np.isfinite(out))
  other = {m: 100 * v + 1 for m, v in x.items()}
  np.testing.assert_array_equal(forward(s, other, masks), out)
  if s.case.zero_when_all_masked:
    np.testing.assert_array_equal(out, 0)


def test_import_string_names_the_custom_fusion():
  import custom_fusion  # pylint: disable=import-outside-toplevel
  cls = registry.lookup("model.fusion", CUSTOM, FUSIONS)
  assert cls is custom_fusion.GatedSum
  assert cls.__doc__ and custom_fusion.__doc__
  assert cls().dim == 64  # keyword-only, every argument has a default
  with pytest.raises(TypeError):
    cls(8)  # pylint: disable=too-many-function-args
  params = jax.eval_shape(cls(dim=8).init, jax.random.key(0),
                          make_tokens(TOKEN_SHAPES), make_masks())["params"]
  assert sorted(params) == ["gate_audio", "gate_image", "proj_audio",
                            "proj_image"]
  assert params["gate_audio"]["kernel"].shape == (5 + 6, 8)
  assert params["proj_image"]["kernel"].shape == (6, 8)
