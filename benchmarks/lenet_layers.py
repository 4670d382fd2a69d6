"""The AV-MNIST spectrogram LeNet's convolutions one at a time, mmjax
against PyTorch: forward, input gradient and filter gradient per layer.

  python benchmarks/lenet_layers.py [--batch 128] [--iters 10]

The convolutions of `configs/avmnist.py`'s spectrogram LeNet (112x112, 6
channels doubling over 6 layers, 5x5 then 3x3, SAME padding, no bias), each
on fixed random operands, in float32. mmjax's side is the function LeNet
calls (`mmjax.models.conv.conv_general_dilated`, NHWC; a sum of shifted
images for the one-channel first layer) and its `jax.vjp`, each jitted alone
with mmjax's compiler options; PyTorch's is `F.conv2d` (NCHW, the layout of
`benchmarks/torch_lenet.py`) and `aten.convolution_backward` for one
gradient at a time. The first layer's input gradient is not timed: the
train step never computes it (its input is data). One JSON row per layer
and operation with both times and `speed_vs_torch` (PyTorch ms / mmjax ms).
"""

import jax
import numpy as np

import harness
from mmjax import hardware
from mmjax.models import conv

SIZE, FEATURES, LAYERS = 112, 6, 6  # configs/avmnist.py SPECTROGRAM_LENET


def layer_shapes(batch: int):
  """[(input NHWC shape, kernel HWIO shape)] per convolution of the LeNet."""
  shapes, size, channels = [], SIZE, 1
  for i in range(LAYERS):
    k, out = (5 if i == 0 else 3), FEATURES * 2**i
    shapes.append(((batch, size, size, channels), (k, k, channels, out)))
    size, channels = size // 2, out
  return shapes


def mmjax_ops(x, w):
  """{op: (jitted function, its arguments)} for one convolution."""
  forward = lambda x, w: conv.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=conv.NHWC)
  dy = np.ones(jax.eval_shape(forward, x, w).shape, np.float32)
  input_grad = lambda x, w, dy: jax.vjp(lambda x: forward(x, w), x)[1](dy)[0]
  filter_grad = lambda x, w, dy: jax.vjp(lambda w: forward(x, w), w)[1](dy)[0]
  jit = lambda f: jax.jit(f, compiler_options=hardware.compiler_options())
  return {"forward": (jit(forward), (x, w)),
          "input_grad": (jit(input_grad), (x, w, dy)),
          "filter_grad": (jit(filter_grad), (x, w, dy))}


def torch_ops(torch, x, w):
  """The same three operations in PyTorch, NCHW / OIHW."""
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
  pad = w.shape[0] // 2  # SAME for odd kernels at stride 1
  dy = torch.ones(x.shape[0], w.shape[3], *x.shape[1:3])
  backward = lambda mask: lambda: torch.ops.aten.convolution_backward(
      dy, xt, wt, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, mask)
  return {"forward": lambda: torch.nn.functional.conv2d(xt, wt, padding=pad),
          "input_grad": backward([True, False, False]),
          "filter_grad": backward([False, True, False])}


def main():
  args = harness.parser(__doc__, batch=128).parse_args()
  torch = harness.import_torch()
  rng = np.random.default_rng(0)
  for i, (x_shape, w_shape) in enumerate(layer_shapes(args.batch)):
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=w_shape).astype(np.float32)
    ours = mmjax_ops(x, w)
    theirs = torch_ops(torch, x, w) if torch else {}
    b, h = x_shape[:2]
    gflop = 2 * b * h * h * np.prod(w_shape) / 1e9
    for op, (fn, fn_args) in ours.items():
      if i == 0 and op == "input_grad":
        continue
      ms = harness.time_ms(lambda: jax.block_until_ready(fn(*fn_args)),
                           iters=args.iters)
      row = {"benchmark": f"lenet_layers/conv_{i}", "op": op,
             "input": list(x_shape), "kernel": list(w_shape),
             "gflop": round(float(gflop), 3), "mmjax_ms": round(ms, 2)}
      if theirs:
        with torch.no_grad():
          torch_ms = harness.time_ms(theirs[op], iters=args.iters)
        row.update(torch_ms=round(torch_ms, 2),
                   speed_vs_torch=round(torch_ms / ms, 3))
      harness.emit(row)


if __name__ == "__main__":
  main()
