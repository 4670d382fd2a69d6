"""Small layers shared by every model, attention with a float32 softmax,
rematerialisation of blocks by policy name, and the logical axis names of
their parameters (tensor parallelism, `mmjax.parallel`).

Every module here takes `dtype` (compute) and `param_dtype` (storage) as
flax.linen's layers do (`mmjax.models.precision`); the defaults, float32,
compute exactly what the modules computed before they had them.
"""

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from mmjax.models.precision import Dtype

# -------------------------------------------------- logical axis names ---

# Names of parameter axes, mapped to mesh axes by `mmjax.parallel`'s
# LOGICAL_RULES: "embed" the model width D, "heads" attention heads H, "kv"
# the head dimension Dh, "mlp" feed-forward hidden units F, "layers" the
# stacked layer axis of `scan_blocks`.
EMBED, HEADS, KV, MLP_AXIS, LAYERS = "embed", "heads", "kv", "mlp", "layers"

_BOXED = contextvars.ContextVar("mmjax_logical_axes", default=False)


@contextlib.contextmanager
def logical_axes():
  """Within this context, `partitioned` initialisers box their parameters
  with logical axis names (`nn.LogicallyPartitioned`), so that
  `jax.eval_shape(model.init, ...)` tells every parameter's names
  (`nn.get_partition_spec`); `experiment.create_train_state` initialises
  inside it and unboxes (`nn.meta.unbox`). Outside it (the default) the
  initialisers return plain arrays: `model.init` gives the parameter tree of
  plain arrays that checkpoints and pretrained loaders hold. The values are
  the same either way."""
  token = _BOXED.set(True)
  try:
    yield
  finally:
    _BOXED.reset(token)


def partitioned(init, *names: str | None):
  """`init` (a flax initialiser (key, shape, dtype) -> array) whose output
  carries the logical axis `names`, one per dimension of the parameter
  (`nn.with_logical_partitioning`), inside `logical_axes()`; outside, the
  plain array. The names are checked against the rank when the mesh
  shardings are made (`mmjax.parallel.param_shardings`)."""
  boxed = nn.with_logical_partitioning(init, names)

  def initialise(*args, **kwargs):
    return (boxed if _BOXED.get() else init)(*args, **kwargs)
  return initialise


# --------------------------------------------------------------- remat ---

NO_REMAT = "none"


def _is_policy(fn) -> bool:
  """A `jax.checkpoint_policies` entry that is itself a policy (a function
  of a primitive and its parameters), not a factory that builds one
  (`save_only_these_names(...)`): policies accept any keyword parameters."""
  try:
    parameters = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


# Policy names `config.remat` may hold: "none" (no rematerialisation) or a
# policy of `jax.checkpoint_policies`, e.g. "nothing_saveable" (save only
# each block's inputs, recompute the rest in the backward pass),
# "dots_saveable", "dots_with_no_batch_dims_saveable".
REMAT_POLICIES = (NO_REMAT,) + tuple(
    name for name in sorted(dir(jax.checkpoint_policies))
    if not name.startswith("_")
    and _is_policy(getattr(jax.checkpoint_policies, name)))


def checkpoint_policy(name: str):
  """The `jax.checkpoint_policies` function of a `REMAT_POLICIES` name
  (None for "none"); ValueError for any other name."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {name!r} (known: "
                     f"{', '.join(REMAT_POLICIES)})")
  return None if name == NO_REMAT else getattr(jax.checkpoint_policies, name)


@functools.cache
def remat(cls: type[nn.Module], policy: str = NO_REMAT) -> type[nn.Module]:
  """`cls`, or with a policy its rematerialised form: `nn.remat(cls)`.

  The returned class has `cls`'s fields and call signature, and an instance
  built with the same `name` has the same parameter tree, so checkpoints of
  either load into the other. Under `jax.grad` its `__call__` saves only
  what `policy` (a `REMAT_POLICIES` name) allows and recomputes the rest in
  the backward pass: less memory, about one more forward pass of compute.
  Outputs and gradients are those of `cls` (up to float rounding). XLA's CPU
  compiler drops the optimisation barriers that keep the recomputation apart
  and merges it back into the forward pass, so on CPU the memory drops only
  where the blocks run in a loop (`scan_blocks`); GPU and TPU compilers keep
  the barriers.

  Every argument of a call is traced by `jax.checkpoint` except `train`,
  which is static (it chooses Python branches: dropout on or off), so
  `train` must be a positional-or-keyword parameter of `cls.__call__`; it
  may be passed either way. Keyword-only arguments must be arrays (or None);
  a module such as `nn.MultiHeadDotProductAttention`, whose dropout is set
  by a field (`deterministic`), needs no `train`.
  """
  jax_policy = checkpoint_policy(policy)
  if jax_policy is None:
    return cls
  signature = inspect.signature(cls.__call__)
  names = list(signature.parameters)  # "self" first, as static_argnums counts
  if "train" not in names:
    lifted = nn.remat(cls, policy=jax_policy)
    lifted.__name__ = lifted.__qualname__ = f"Remat{cls.__name__}"
    return lifted
  train = names.index("train")
  if signature.parameters["train"].kind is not (
      inspect.Parameter.POSITIONAL_OR_KEYWORD):
    raise TypeError(f"{cls.__name__}.__call__ must take `train` as a "
                    "positional-or-keyword parameter to be rematerialised")
  lifted = nn.remat(cls, policy=jax_policy, static_argnums=(train,))
  leading = [signature.parameters[n] for n in names[1:train + 1]]

  class Rematerialised(lifted):  # pylint: disable=missing-class-docstring
    __doc__ = cls.__doc__

    def __call__(self, *args, **kwargs):
      # The parameters up to `train` by position (defaults filled in), so
      # that `train` reaches nn.remat's static_argnums however it was passed;
      # the later ones as they were given.
      args, kwargs = list(args), dict(kwargs)
      for p in leading[len(args):]:
        args.append(kwargs.pop(p.name, p.default))
      return super().__call__(*args, **kwargs)

  Rematerialised.__name__ = Rematerialised.__qualname__ = (
      f"Remat{cls.__name__}")
  return Rematerialised


def scan_blocks(block: nn.Module, x: jnp.ndarray, length: int,
                **call_kwargs) -> jnp.ndarray:
  """`length` blocks applied in turn with `nn.scan`: x [B, N, D] -> [B, N, D].

  `block` (an unbound module, e.g. `remat(TransformerBlock, policy)(...,
  name="blocks")`) is called as `block(x, **call_kwargs)` once per layer,
  each layer with its own parameters: the parameters are stacked along a
  new leading axis of size `length` under the block's name (e.g.
  "blocks/mlp/dense_0/kernel" [length, D, mlp_dim]) instead of one subtree
  per layer ("block_0", "block_1", ...), and each layer draws its own
  initialisation and dropout keys. The layer is compiled once however deep
  the stack is, and a rematerialised block then saves only each layer's
  input between the forward and the backward pass (a loop the compiler
  cannot fuse across layers). `call_kwargs` (masks, `train`) are the same
  for every layer. The stacked axis is named "layers" (`logical_axes`).
  """
  def step(module, carry, _):
    return module(carry, **call_kwargs), None

  scanned = nn.scan(step, variable_axes={"params": 0, "intermediates": 0},
                    split_rngs={"params": True, "dropout": True},
                    length=length,
                    metadata_params={nn.PARTITION_NAME: LAYERS})
  x, _ = scanned(block, x, None)
  return x


# ----------------------------------------------------------- attention ---


def fp32_softmax_attention(query, key, value, bias=None, mask=None,
                           broadcast_dropout: bool = True, dropout_rng=None,
                           dropout_rate: float = 0.0,
                           deterministic: bool = False, dtype=None,
                           precision=None, module=None):
  """`nn.dot_product_attention` whose softmax is computed in float32.

  query [B, Q, H, Dh], key and value [B, K, H, Dh] -> [B, Q, H, Dh]. The
  logits q.k / sqrt(Dh) are computed in `dtype` (default: the promoted input
  dtype), the mask and the softmax in float32, and the attention weights are
  cast back to `dtype` for the weighted sum of the values, so the output is
  in `dtype`. In float32 every step is the one of `nn.dot_product_attention`
  (the same values).
  """
  query, key, value = promote_dtype(query, key, value, dtype=dtype)
  weights = nn.dot_product_attention_weights(
      query, key, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
      deterministic, query.dtype, precision, module,
      force_fp32_for_softmax=True)
  return jnp.einsum("...hqk,...khd->...qhd", weights.astype(value.dtype),
                    value, precision=precision)


def attention(num_heads: int, *, dtype: Dtype = jnp.float32,
              param_dtype: Dtype = jnp.float32, remat_policy: str = NO_REMAT,
              **kwargs) -> nn.MultiHeadDotProductAttention:
  """`nn.MultiHeadDotProductAttention` computing in `dtype` with a float32
  softmax (`fp32_softmax_attention`), parameters in `param_dtype`; with a
  remat policy, its rematerialised form (same parameters). `kwargs` go to
  the module (name, dropout_rate, deterministic, kernel_init, ...).

  Its parameters carry logical axis names (`partitioned`): query, key and
  value kernels [D, H, Dh] ("embed", "heads", "kv") and biases [H, Dh], the
  out kernel [H, Dh, D] ("heads", "kv", "embed") and bias [D], so that
  tensor parallelism splits the heads (`mmjax.parallel.LOGICAL_RULES`)."""
  kernel_init = kwargs.pop("kernel_init", nn.initializers.lecun_normal())
  bias_init = kwargs.pop("bias_init", nn.initializers.zeros_init())
  out_kernel_init = kwargs.pop("out_kernel_init", None) or kernel_init
  out_bias_init = kwargs.pop("out_bias_init", None) or bias_init
  return remat(nn.MultiHeadDotProductAttention, remat_policy)(
      num_heads=num_heads, dtype=dtype, param_dtype=param_dtype,
      attention_fn=fp32_softmax_attention,
      kernel_init=partitioned(kernel_init, EMBED, HEADS, KV),
      bias_init=partitioned(bias_init, HEADS, KV),
      out_kernel_init=partitioned(out_kernel_init, HEADS, KV, EMBED),
      out_bias_init=partitioned(out_bias_init, EMBED), **kwargs)


# -------------------------------------------------------------- layers ---


class MLP(nn.Module):
  """Dense layers with ReLU between them: [..., D_in] -> [..., features[-1]].

  Computes in `dtype` (the output is `dtype`), parameters in `param_dtype`.

  Attributes:
    features: output width of each Dense layer; no activation after the last.
  """
  features: Sequence[int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i, width in enumerate(self.features):
      x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                   name=f"dense_{i}")(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


def masked_mean(values: jnp.ndarray, present: jnp.ndarray) -> jnp.ndarray:
  """Mean over axis 1 of `values` [B, M, ...], counting only present entries.

  `present` is [B, M] (bool or float weights). Rows where nothing is present
  give zeros rather than NaN.
  """
  weights = present.astype(values.dtype)
  weights = weights.reshape(weights.shape + (1,) * (values.ndim - 2))
  total = jnp.sum(values * weights, axis=1)
  count = jnp.sum(weights, axis=1)
  return total / jnp.maximum(count, 1.0)


def zero_masked(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """x [B, ...] with rows whose mask [B] is False set to zero."""
  return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, 0)


def pool_tokens(tokens: jnp.ndarray) -> jnp.ndarray:
  """Mean over the token axis: [B, N, D] -> [B, D]."""
  return jnp.mean(tokens, axis=1)


def key_mask(present: jnp.ndarray, num_queries: int,
             num_keys: int) -> jnp.ndarray:
  """Attention mask [B, 1, Q, K] letting every query see keys where `present`.

  `present` is [B] (one flag per example for all K keys) or [B, K].
  """
  if present.ndim == 1:
    present = jnp.broadcast_to(present[:, None], (present.shape[0], num_keys))
  return jnp.broadcast_to(present[:, None, None, :],
                          (present.shape[0], 1, num_queries, num_keys))


def quick_gelu(x: jnp.ndarray) -> jnp.ndarray:
  """x * sigmoid(1.702 x): the GELU approximation of OpenAI's CLIP (Radford
  et al., "Learning Transferable Visual Models From Natural Language
  Supervision", ICML 2021; Hendrycks and Gimpel, "Gaussian Error Linear
  Units", 2016, section 2)."""
  return x * jax.nn.sigmoid(1.702 * x)


# Feed-forward activations by name: the exact (erf) GELU of BERT and ViT,
# its tanh approximation (GPT-2's "gelu_new", SigLIP's "gelu_pytorch_tanh"),
# CLIP's sigmoid approximation and the SiLU of Llama's SwiGLU (x sigmoid(x)).
ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "quick_gelu": quick_gelu,
    "silu": nn.silu,
}


def activation_fn(name: str):
  """The `ACTIVATIONS` function of `name`; ValueError for another name."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r} (known: "
                     f"{', '.join(ACTIVATIONS)})")
  return ACTIVATIONS[name]


class FeedForward(nn.Module):
  """The transformer MLP: Dense(mlp_dim) -> activation -> dropout -> Dense(D).

  [..., D] -> [..., D] in `dtype`; parameters in `param_dtype`. The
  activation is an `ACTIVATIONS` name: the exact (erf) GELU by default.
  Kernels [D, F] ("embed", "mlp") and [F, D] ("mlp", "embed"), biases [F]
  and [D] (`partitioned`): tensor parallelism splits the hidden units.

  `gated=True` is a gated linear unit (Shazeer, "GLU Variants Improve
  Transformer", 2020; with "silu" the SwiGLU of PaLM and Llama):
  dense_1(act(dense_0(x)) * dense_up(x)), "dense_up" a second [D, F]
  projection. `use_bias=False` drops the three biases (Llama).
  """
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  activation: str = "gelu"
  gated: bool = False
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    width = x.shape[-1]
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              use_bias=self.use_bias)
    kernel, bias = nn.initializers.lecun_normal(), nn.initializers.zeros_init()
    hidden = lambda name: dense(
        self.mlp_dim, name=name,
        kernel_init=partitioned(kernel, EMBED, MLP_AXIS),
        bias_init=partitioned(bias, MLP_AXIS))(x)
    y = activation_fn(self.activation)(hidden("dense_0"))
    if self.gated:
      y = y * hidden("dense_up")
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return dense(width, name="dense_1",
                 kernel_init=partitioned(kernel, MLP_AXIS, EMBED),
                 bias_init=partitioned(bias, EMBED))(y)


class TransformerBlock(nn.Module):
  """Attention plus feed-forward with residuals: [B, N, D] -> [B, N, D].

  Self-attention by default, `mask` an attention mask [B, 1, N, N] (see
  `key_mask`). Cross-attention with `context` [B, K, D]: queries from `x`,
  keys and values from `context`, and `present` ([B] or [B, K], bool) says
  which keys exist. Masked keys get zero attention weight, and where an
  example has no key at all the attention output is zeroed, so `x` receives
  no residual update from the context (flax attention would otherwise attend
  uniformly to the masked keys).

  `post_norm=False` is the pre-LayerNorm block of ViT (x + f(LN(x)); with a
  context, x + f(LN(x), LN(context)), the context's own LayerNorm as in MulT);
  `post_norm=True` the post-LayerNorm block of BERT and the original
  Transformer (LN(x + f(x))), whose cross-attention form is one stream's half
  of a ViLBERT co-attention layer.

  Computes in `dtype` (the output is `dtype`; LayerNorm statistics and the
  attention softmax in float32), parameters in `param_dtype`.
  `remat(TransformerBlock, policy)` is its rematerialised form, with the same
  parameters. `activation` is the feed-forward's (`ACTIVATIONS`).
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  post_norm: bool = False
  layer_norm_epsilon: float = 1e-6
  activation: str = "gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, present=None, mask=None,
               train: bool = False):
    """x [B, N, D], context [B, K, D] or None, present [B] or [B, K] bool
    (with a context), mask [B, 1, N, N] bool (without) -> [B, N, D]."""
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attend_fn = attention(self.num_heads, dropout_rate=self.dropout,
                          deterministic=not train, name="attention",
                          **precision)
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_epsilon,
                                     name=name, **precision)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    ffn = FeedForward(self.mlp_dim, self.dropout, name="mlp",
                      activation=self.activation, **precision)
    any_key = None
    if context is not None:
      if present is None or mask is not None:
        raise ValueError("cross-attention takes `present` [B] or [B, K], "
                         "not `mask`")
      mask = key_mask(present, x.shape[1], context.shape[1])
      any_key = present if present.ndim == 1 else jnp.any(present, axis=-1)

    def attend(queries, keys):
      update = drop(attend_fn(queries, keys, mask=mask))
      return update if any_key is None else zero_masked(update, any_key)

    if self.post_norm:
      x = norm("norm_attention")(x + attend(
          x, x if context is None else context))
      return norm("norm_mlp")(x + drop(ffn(x, train=train)))
    y = norm("norm_attention")(x)
    x = x + attend(y, y if context is None else norm("norm_context")(context))
    return x + drop(ffn(norm("norm_mlp")(x), train=train))
