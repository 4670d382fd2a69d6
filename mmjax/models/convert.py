"""Shared pieces of the torch-free checkpoint converters.

`load_safetensors` reads a checkpoint's tensors (one file or an index of
shards) without torch; `torch_dense`, `torch_norm` and `split_heads` turn
PyTorch layouts (Linear weights [out, in], fused head widths) into Flax's;
`param_shapes` and `first_mismatch` say where a converted tree does not fit
the module it is meant for (`check_fits`). Used by `mmjax.models.causal_lm`
(GPT-2) and `mmjax.models.clip` (CLIP).
"""

from collections.abc import Mapping
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
from einops import rearrange


class TrackedState(dict):
  """A checkpoint's tensors (name -> array) that records which were read:
  a missing one is a ValueError naming it (`what` says whose), and
  `check_all_read()` names the first tensor nothing read."""

  def __init__(self, state: Mapping[str, Any], what: str):
    super().__init__(state)
    self.what, self.read = what, set()

  def __getitem__(self, name):
    if name not in self:
      raise ValueError(f"{self.what} lacks tensor {name!r}")
    self.read.add(name)
    return super().__getitem__(name)

  def check_all_read(self, model: str):
    """ValueError naming the first tensor with no place in `model`."""
    left_over = [k for k in self if k not in self.read]
    if left_over:
      raise ValueError(f"{self.what} tensor {left_over[0]!r} has no place "
                       f"in {model}")


def hf_checkpoint_state(state: Mapping[str, Any], dtype=np.float32
                        ) -> TrackedState:
  """A Hugging Face checkpoint's tensors as `dtype` arrays in a
  TrackedState, without the `position_ids` buffers that some
  transformers versions save (constants, not weights)."""
  return TrackedState({k: np.asarray(v, dtype) for k, v in state.items()
                       if not k.endswith("position_ids")}, "checkpoint")


def torch_dense(state: Mapping[str, Any], name: str,
                bias: bool = True) -> dict[str, Any]:
  """torch Linear `name` (weight [out, in], bias [out]) as a Flax Dense
  {"kernel" [in, out], "bias"}; KeyError naming a missing tensor."""
  params = {"kernel": np.asarray(state[f"{name}.weight"]).T}
  if bias:
    params["bias"] = np.asarray(state[f"{name}.bias"])
  return params


def torch_attention(weights, biases, out: Mapping[str, Any],
                    num_heads: int) -> dict[str, Any]:
  """torch query, key and value projections (weights [D, D] each, [out, in]
  as torch stores them; biases [D]) and the output projection (a
  `torch_dense` {"kernel" [D, D], "bias"}) as
  nn.MultiHeadDotProductAttention's {query, key, value: kernel [D, H, D/H],
  bias [H, D/H]; out: kernel [H, D/H, D], bias [D]}."""
  params = {}
  for ours, weight, bias in zip(("query", "key", "value"), weights, biases):
    params[ours] = {
        "kernel": split_heads(np.asarray(weight).T, num_heads,
                              "d (h k) -> d h k"),
        "bias": split_heads(np.asarray(bias), num_heads, "(h k) -> h k")}
  params["out"] = {"kernel": split_heads(out["kernel"], num_heads,
                                         "(h k) d -> h k d"),
                   "bias": out["bias"]}
  return params


def torch_norm(state: Mapping[str, Any], name: str) -> dict[str, Any]:
  """torch LayerNorm `name` {weight, bias} as Flax's {"scale", "bias"}."""
  return {"scale": np.asarray(state[f"{name}.weight"]),
          "bias": np.asarray(state[f"{name}.bias"])}


def split_heads(x: np.ndarray, num_heads: int, pattern: str) -> np.ndarray:
  """rearrange(x, pattern) into heads; an x whose width is not divisible by
  num_heads is returned as it is, for `check_fits` to report."""
  axis = 0 if pattern.startswith("(") else -1
  if x.shape[axis] % num_heads:
    return x
  return rearrange(x, pattern, h=num_heads)


def _items(tree):
  return tree.items() if isinstance(tree, Mapping) else ()


def first_mismatch(expected_tree: Mapping[str, Any],
                   loaded_tree: Mapping[str, Any],
                   path: str = "") -> str | None:
  """The first difference between two parameter trees, or None.

  Walks `expected_tree` in its order (a Flax init's: the model's order),
  then the keys only `loaded_tree` has; leaves are compared by shape only
  (arrays or `jax.ShapeDtypeStruct`s).

  Returns:
    None if the trees have the same keys and leaf shapes, else one line
    starting with the parameter's "/"-joined path, e.g.
    "position_embeddings: expected shape (32, 16), got (64, 16)".
  """
  if not isinstance(loaded_tree, Mapping):
    return f"{path or '<root>'}: expected a subtree, got an array"
  for key, want in _items(expected_tree):
    name = f"{path}/{key}" if path else str(key)
    if key not in loaded_tree:
      return f"{name}: missing from the checkpoint"
    got = loaded_tree[key]
    if isinstance(want, Mapping):
      found = first_mismatch(want, got, name)
      if found:
        return found
    elif isinstance(got, Mapping):
      return f"{name}: expected an array of shape {tuple(want.shape)}, got " \
             "a subtree"
    elif tuple(want.shape) != tuple(np.shape(got)):
      return (f"{name}: expected shape {tuple(want.shape)}, got "
              f"{tuple(np.shape(got))}")
  for key in loaded_tree:
    if key not in expected_tree:
      name = f"{path}/{key}" if path else str(key)
      return f"{name}: not a parameter of the model"
  return None


def _skeleton(tree):
  """The nested keys of `tree`, in its order."""
  return ({k: _skeleton(v) for k, v in tree.items()}
          if isinstance(tree, Mapping) else None)


def _in_order(tree, skeleton):
  return (tree if skeleton is None else
          {k: _in_order(tree[k], sub) for k, sub in skeleton.items()})


def param_shapes(module, *args, **kwargs) -> dict[str, Any]:
  """The parameter shapes (`jax.ShapeDtypeStruct`s) of `module.init(key,
  *args, **kwargs)`, without allocating them, in the model's order (init's,
  which eval_shape would sort). `args` may be `jax.ShapeDtypeStruct`s."""
  order = {}

  def init(*inputs):
    params = module.init(jax.random.key(0), *inputs, **kwargs)["params"]
    order["params"] = _skeleton(params)
    return params

  shapes = jax.eval_shape(init, *args)
  return _in_order(shapes, order["params"])


def load_safetensors(directory: str | os.PathLike,
                     stem: str = "model") -> dict[str, Any]:
  """All tensors of `directory`/<stem>.safetensors, or of the shards that
  <stem>.safetensors.index.json lists, as arrays on the CPU (bfloat16
  included): name -> array."""
  directory = pathlib.Path(directory)
  single = directory / f"{stem}.safetensors"
  index = directory / f"{stem}.safetensors.index.json"
  if single.is_file():
    files = [single]
  elif index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = [directory / f for f in dict.fromkeys(weight_map.values())]
  else:
    raise FileNotFoundError(
        f"{directory} has neither {stem}.safetensors nor "
        f"{stem}.safetensors.index.json (torch-free loading needs safetensors; "
        "convert a pytorch_model.bin with transformers' save_pretrained)")
  try:
    # pylint: disable-next=import-outside-toplevel
    from safetensors.flax import load_file
  except ImportError as e:
    raise ImportError('loading checkpoints needs `safetensors`: pip install '
                      '-e ".[text]"') from e
  try:
    device = jax.devices("cpu")[0]
  except RuntimeError:  # no CPU backend enabled (JAX_PLATFORMS)
    device = None
  state = {}
  with jax.default_device(device):
    for path in files:
      state.update(load_file(str(path)))
  return state


def check_fits(params: Mapping[str, Any], expected: Mapping[str, Any],
               what: str) -> None:
  """Raises ValueError naming the first parameter of `params` that does not
  fit the shapes `expected` (`param_shapes`): missing, extra or of another
  shape. `what` names the model in the message."""
  mismatch = first_mismatch(expected, params)
  if mismatch:
    raise ValueError(f"checkpoint does not fit {what}: {mismatch}")
