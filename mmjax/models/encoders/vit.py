"""Vision Transformer image encoder (big_vision conventions)."""

import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from mmjax.models.layers import (NO_REMAT, FeedForward, TransformerBlock,
                                 attention, remat, scan_blocks)
from mmjax.models.precision import Dtype

# size -> (width, depth, mlp_dim, num_heads), as in big_vision's
# `decode_variant` (Zhai et al., "Scaling Vision Transformers", CVPR 2022).
VIT_SIZES = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
}

POOLS = ("cls", "gap", "map", "none")
POSEMBS = ("learn", "sincos2d")


def decode_variant(variant: str) -> dict[str, int]:
  """Decodes a "SIZE/PATCH" variant such as "B/16" into its configuration.

  Returns a dict with keys width, depth, mlp_dim, num_heads and patch_size.
  """
  size, _, patch = variant.partition("/")
  if size not in VIT_SIZES or not patch.isdigit() or int(patch) < 1:
    raise ValueError(f"Unknown ViT variant {variant!r}; expected SIZE/PATCH "
                     f"with SIZE in {sorted(VIT_SIZES)}, e.g. 'B/16'")
  width, depth, mlp_dim, num_heads = VIT_SIZES[size]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
              patch_size=int(patch))


def posemb_sincos_2d(h: int, w: int, width: int,
                     temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2D sine-cosine position embedding [1, h * w, width].

  Beyer, Zhai and Kolesnikov, "Better plain ViT baselines for ImageNet-1k",
  2022 (big_vision `posemb_sincos_2d`): a quarter of the channels each for
  sin(x), cos(x), sin(y), cos(y) at frequencies temperature**(-k / (K - 1)),
  k = 0 .. K - 1, K = width / 4.
  """
  if width % 4:
    raise ValueError(f"sincos2d position embedding needs a width divisible "
                     f"by 4, got {width}")
  y, x = np.mgrid[:h, :w]
  quarter = width // 4
  omega = 1.0 / temperature**(np.arange(quarter) / max(quarter - 1, 1))
  y = np.einsum("m,d->md", y.ravel(), omega)
  x = np.einsum("m,d->md", x.ravel(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


class MAPHead(nn.Module):
  """Multihead attention pooling: [B, N, D] -> [B, 1, D].

  Zhai et al., "Scaling Vision Transformers", CVPR 2022 (big_vision
  `MAPHead`): a learned probe query attends to the tokens; the result r
  becomes r + MLP(LN(r)), the MLP's activation an `ACTIVATIONS` name.
  Computes in `dtype` (softmax and LayerNorm statistics in float32),
  parameters (the probe too) in `param_dtype`.
  """
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, _, d = x.shape
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d),
                       self.param_dtype)
    probe = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d))
    x = attention(self.num_heads,
                  kernel_init=nn.initializers.xavier_uniform(),
                  name="attention", **precision)(probe, x)
    y = nn.LayerNorm(self.layer_norm_epsilon, name="norm", **precision)(x)
    return x + FeedForward(self.mlp_dim, activation=self.activation,
                           name="mlp", **precision)(y)


class ViT(nn.Module):
  """Vision Transformer: image -> tokens [B, N, D] or a pooled [B, 1, D].

  Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
  Recognition at Scale", ICLR 2021, with the big_vision conventions (Beyer,
  Zhai and Kolesnikov, "Better plain ViT baselines for ImageNet-1k", 2022):
  non-overlapping patches embedded by a stride-`patch_size` convolution, a
  position embedding, `depth` pre-LayerNorm transformer blocks and a final
  LayerNorm, then pooling.

  Attributes:
    variant: "SIZE/PATCH" with SIZE in Ti, S, M, B, L (e.g. "B/16"); when set
      it overrides width, depth, mlp_dim, num_heads and patch_size.
    width, depth, mlp_dim, num_heads, patch_size: the explicit configuration
      used when `variant` is None (default: Ti/16).
    pool: "cls" (a learned class token is prepended and its output returned,
      [B, 1, D]), "gap" (mean of the patch tokens, [B, 1, D]), "map"
      (multihead attention pooling, `MAPHead`, [B, 1, D]) or "none" (every
      patch token, [B, N, D]).
    posemb: "learn" (a learned embedding, N + 1 positions with the class
      token as in Dosovitskiy et al. eq. 1, N otherwise) or "sincos2d" (the
      fixed 2D sine-cosine embedding of the patches, not a parameter; the
      class token then gets none).
    dropout: dropout rate after the position embedding and inside the blocks.
    pre_norm: a LayerNorm ("norm_pre") after the position embedding, before
      the blocks (CLIP's `ln_pre`, Radford et al. 2021).
    patch_bias: the patch embedding has a bias (CLIP's has none).
    activation: the blocks' feed-forward activation, a
      `mmjax.models.layers.ACTIVATIONS` name (CLIP: "quick_gelu", SigLIP:
      "gelu_tanh").
    layer_norm_epsilon: of every LayerNorm (big_vision 1e-6, CLIP 1e-5).
    dtype: compute dtype (the output's); LayerNorm statistics and attention
      softmax stay float32.
    param_dtype: the dtype parameters are stored in (the class token and
      position embedding too).
    remat: a `mmjax.models.layers.REMAT_POLICIES` name; other than "none",
      each transformer block is rematerialised under that policy (same
      parameters; less memory for activations in the backward pass).
    scan_layers: run the blocks with `nn.scan` (`scan_blocks`): one compiled
      layer, parameters stacked as "blocks/..." [depth, ...] instead of
      "block_0" ... "block_{depth-1}" (a different parameter tree: off by
      default, so checkpoints of the unrolled layout keep loading).

  Input [B, H, W] or [B, H, W, C] floats; N = (H // patch) * (W // patch).
  """
  variant: str | None = None
  width: int = 192
  depth: int = 12
  mlp_dim: int = 768
  num_heads: int = 3
  patch_size: int = 16
  pool: str = "gap"
  posemb: str = "learn"
  dropout: float = 0.0
  pre_norm: bool = False
  patch_bias: bool = True
  activation: str = "gelu"
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = NO_REMAT
  scan_layers: bool = False

  def config(self) -> dict[str, int]:
    """The effective width, depth, mlp_dim, num_heads and patch_size."""
    if self.variant is not None:
      return decode_variant(self.variant)
    return dict(width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
                num_heads=self.num_heads, patch_size=self.patch_size)

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    if self.pool not in POOLS:
      raise ValueError(f"Unknown ViT pool {self.pool!r}; expected one of "
                       f"{POOLS}")
    if self.posemb not in POSEMBS:
      raise ValueError(f"Unknown ViT posemb {self.posemb!r}; expected one of "
                       f"{POSEMBS}")
    cfg = self.config()
    width, patch = cfg["width"], cfg["patch_size"]
    if x.ndim == 3:
      x = x[..., None]
    precision = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Conv(width, (patch, patch), strides=(patch, patch),
                padding="VALID", use_bias=self.patch_bias, name="embedding",
                **precision)(x)
    b, h, w, _ = x.shape
    x = rearrange(x, "b h w d -> b (h w) d")  # patches in raster order
    if self.pool == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, width),
                       self.param_dtype).astype(x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, width)), x], axis=1)
    if self.posemb == "learn":
      x = x + self.param("pos_embedding",
                         nn.initializers.normal(stddev=width**-0.5),
                         (1, x.shape[1], width),
                         self.param_dtype).astype(x.dtype)
    else:
      pe = jnp.asarray(posemb_sincos_2d(h, w, width), x.dtype)
      offset = x.shape[1] - h * w  # 1 with the class token, which gets none.
      x = x.at[:, offset:].add(pe)
    norm = functools.partial(nn.LayerNorm, self.layer_norm_epsilon,
                             **precision)
    if self.pre_norm:
      x = norm(name="norm_pre")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    block = functools.partial(remat(TransformerBlock, self.remat),
                              cfg["num_heads"], cfg["mlp_dim"], self.dropout,
                              post_norm=False,
                              layer_norm_epsilon=self.layer_norm_epsilon,
                              activation=self.activation, **precision)
    if self.scan_layers:
      x = scan_blocks(block(name="blocks"), x, cfg["depth"], train=train)
    else:
      for i in range(cfg["depth"]):
        x = block(name=f"block_{i}")(x, train=train)
    x = norm(name="encoder_norm")(x)
    if self.pool == "cls":
      return x[:, :1]
    if self.pool == "gap":
      return jnp.mean(x, axis=1, keepdims=True)
    if self.pool == "map":
      return MAPHead(cfg["num_heads"], cfg["mlp_dim"], self.activation,
                     self.layer_norm_epsilon, name="map_head", **precision)(x)
    return x
