"""mmjax's transformer models in PyTorch, layer for layer, for the benchmarks:
the ViT and BERT towers of `ContrastiveModel` and the Perceiver and
co-attention fusions of `MultimodalClassifier`, with the same parameter
count and, given mmjax's parameters (`load_flax_params`), the same outputs
(tests/test_benchmark_models.py).

Every module and parameter is named as in mmjax's Flax parameter tree
(`tower_image.encoder.block_0.attention.out.weight` is
`tower_image/encoder/block_0/attention/out/kernel`), so `load_flax_params`
maps one onto the other by rules, not by a table. What mmjax's modules are,
and what these copy:

  attention     flax `MultiHeadDotProductAttention`: query, key, value and
                output projections with biases, softmax(q k^T / sqrt(d_head))
                (`F.scaled_dot_product_attention`); the query, key and value
                projections are one fused [3D, D] Linear (`qkv`) in
                self-attention, `query` and a fused `kv` in cross-attention.
                A boolean mask is True where a key may be seen.
  feed-forward  `layers.FeedForward`: Linear -> exact (erf) GELU -> Linear
                (mmjax passes `approximate=False`, torch's `nn.GELU()`).
  block         `layers.TransformerBlock`: pre-LN (ViT) x + f(LN(x)), or
                post-LN (BERT, ViLBERT) LN(x + f(x)); cross-attention zeroes
                the update of an example that has no key at all.
  LayerNorm     eps 1e-6 (flax's default: ViT, the fusions), 1e-12 in BERT.
  ViT           stride-patch Conv2d with bias, learned position embedding
                (no class token), pre-LN blocks, final LayerNorm (eps 1e-6),
                mean over the patch tokens ("gap").
  BERT          word + learned position + token-type embeddings (type 0),
                LayerNorm, post-LN blocks with padded keys (id 0) masked,
                mean over the real tokens ("mean"), no pooler.
  tower         encoder -> mean over tokens -> Linear with bias -> L2 norm.

Images come as uint8 [B, H, W, C] and are scaled by 1/255 inside, as mmjax
does; token ids as int64 [B, L], 0 for padding.
"""

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# ----------------------------------------------------------------- layers --


class Attention(nn.Module):
  """Multi-head attention: queries [B, Q, D], keys/values [B, K, D] -> [B, Q, D]."""

  def __init__(self, dim: int, num_heads: int, cross: bool = False):
    super().__init__()
    self.num_heads, self.cross = num_heads, cross
    if cross:
      self.query = nn.Linear(dim, dim)
      self.kv = nn.Linear(dim, 2 * dim)
    else:
      self.qkv = nn.Linear(dim, 3 * dim)
    self.out = nn.Linear(dim, dim)

  def forward(self, x, context=None, mask=None):
    """mask: bool, broadcastable to [B, 1, Q, K], True where a key is seen."""
    b, q_len, d = x.shape
    heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
    if self.cross:
      q = heads(self.query(x))
      k, v = map(heads, self.kv(context).chunk(2, dim=-1))
    else:
      q, k, v = map(heads, self.qkv(x).chunk(3, dim=-1))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return self.out(y.transpose(1, 2).reshape(b, q_len, d))


class FeedForward(nn.Module):
  """Linear(mlp_dim) -> exact GELU -> Linear(D)."""

  def __init__(self, dim: int, mlp_dim: int):
    super().__init__()
    self.dense_0, self.dense_1 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)

  def forward(self, x):
    return self.dense_1(F.gelu(self.dense_0(x)))


def key_mask(present):
  """present [B] or [B, K] bool -> an attention mask [B, 1, 1, K or 1]."""
  return (present[:, None] if present.ndim == 1 else present)[:, None, None, :]


class TransformerBlock(nn.Module):
  """`mmjax.models.layers.TransformerBlock`: [B, N, D] -> [B, N, D].

  Self-attention (`mask` [B, 1, N, N] or broadcastable), or with `cross`
  attention to a context [B, K, D] of which `present` ([B] or [B, K]) says
  which keys exist.
  """

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, *,
               post_norm: bool = False, eps: float = 1e-6,
               cross: bool = False):
    super().__init__()
    self.post_norm = post_norm
    self.attention = Attention(dim, num_heads, cross)
    self.norm_attention = nn.LayerNorm(dim, eps=eps)
    if cross and not post_norm:
      self.norm_context = nn.LayerNorm(dim, eps=eps)
    self.mlp = FeedForward(dim, mlp_dim)
    self.norm_mlp = nn.LayerNorm(dim, eps=eps)

  def forward(self, x, context=None, present=None, mask=None):
    any_key = None
    if context is not None:
      mask = key_mask(present)
      any_key = present if present.ndim == 1 else present.any(-1)

    def attend(queries, keys):
      update = self.attention(queries, keys, mask)
      if any_key is None:
        return update
      return torch.where(any_key[:, None, None], update, 0.0)

    if self.post_norm:
      x = self.norm_attention(x + attend(x, x if context is None else context))
      return self.norm_mlp(x + self.mlp(x))
    y = self.norm_attention(x)
    x = x + attend(y, y if context is None else self.norm_context(context))
    return x + self.mlp(self.norm_mlp(x))


def masked_mean(x, present):
  """Mean of x [B, N, D] over the tokens where present [B, N]; zeros if none."""
  weights = present.to(x.dtype)[..., None]
  return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _blocks(module: nn.Module, prefix: str, count: int, make) -> list:
  """`count` blocks registered as `<prefix>_<i>` (mmjax's names)."""
  blocks = [make() for _ in range(count)]
  for i, block in enumerate(blocks):
    module.add_module(f"{prefix}_{i}", block)
  return blocks


# --------------------------------------------------------------- encoders --


class ViT(nn.Module):
  """`mmjax.models.encoders.ViT` with pool "gap" and posemb "learn":
  uint8 images [B, H, W, C] -> [B, width]."""

  def __init__(self, *, image_size: int, width: int, depth: int, mlp_dim: int,
               num_heads: int, patch_size: int, channels: int = 3):
    super().__init__()
    self.embedding = nn.Conv2d(channels, width, patch_size, stride=patch_size)
    tokens = (image_size // patch_size)**2
    self.pos_embedding = nn.Parameter(torch.randn(1, tokens, width) *
                                      width**-0.5)
    self.blocks = _blocks(self, "block", depth, lambda: TransformerBlock(
        width, num_heads, mlp_dim, post_norm=False, eps=1e-6))
    self.encoder_norm = nn.LayerNorm(width, eps=1e-6)

  def forward(self, images):
    x = images.permute(0, 3, 1, 2).float() / 255.0
    x = self.embedding(x).flatten(2).transpose(1, 2)  # patches in raster order
    x = x + self.pos_embedding
    for block in self.blocks:
      x = block(x)
    return self.encoder_norm(x).mean(1)


class Bert(nn.Module):
  """`mmjax.models.encoders.BertEncoder` with pool "mean": ids [B, L] (0 is
  padding) -> [B, hidden_size], the mean over the real tokens."""

  def __init__(self, *, vocab_size: int, hidden_size: int, num_layers: int,
               num_heads: int, intermediate_size: int,
               max_position_embeddings: int = 512, type_vocab_size: int = 2,
               layer_norm_eps: float = 1e-12):
    super().__init__()
    self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
    self.position_embeddings = nn.Embedding(max_position_embeddings,
                                            hidden_size)
    self.type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
    self.embeddings_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
    self.layers = _blocks(self, "layer", num_layers, lambda: TransformerBlock(
        hidden_size, num_heads, intermediate_size, post_norm=True,
        eps=layer_norm_eps))

  def forward(self, token_ids):
    present = token_ids != 0
    positions = torch.arange(token_ids.shape[1], device=token_ids.device)
    x = (self.word_embeddings(token_ids) + self.position_embeddings(positions)
         + self.type_embeddings(torch.zeros_like(token_ids)))
    x = self.embeddings_norm(x)
    mask = key_mask(present)
    for layer in self.layers:
      x = layer(x, mask=mask)
    return masked_mean(x, present)


# ------------------------------------------------------------ contrastive --

# Initial (log scale, bias) per objective, as mmjax.models.contrastive.
INITIAL_LOGIT_PARAMS = {"softmax": (math.log(1 / 0.07), 0.0),
                        "sigmoid": (math.log(10.0), -10.0)}


class Tower(nn.Module):
  """`mmjax.models.contrastive.Tower`: encoder -> Linear -> L2 normalised."""

  def __init__(self, encoder: nn.Module, width: int, embed_dim: int):
    super().__init__()
    self.encoder, self.projection = encoder, nn.Linear(width, embed_dim)

  def forward(self, x):
    z = self.projection(self.encoder(x))
    return z / z.norm(dim=-1, keepdim=True).clamp(min=1e-12)


class ContrastiveModel(nn.Module):
  """`mmjax.models.contrastive.ContrastiveModel` of a ViT image tower and a
  BERT text tower: batch {"image", "text"} -> {"embedding/image",
  "embedding/text", "log_scale", "bias"}."""

  def __init__(self, image: ViT, image_width: int, text: Bert,
               text_width: int, embed_dim: int, objective: str = "softmax"):
    super().__init__()
    log_scale, bias = INITIAL_LOGIT_PARAMS[objective]
    self.log_scale = nn.Parameter(torch.tensor(log_scale))
    self.bias = nn.Parameter(torch.tensor(bias))
    self.tower_image = Tower(image, image_width, embed_dim)
    self.tower_text = Tower(text, text_width, embed_dim)

  def forward(self, batch):
    return {"embedding/image": self.tower_image(batch["image"]),
            "embedding/text": self.tower_text(batch["text"]),
            "log_scale": self.log_scale, "bias": self.bias}


def _l2_normalize(x, eps: float = 1e-6):
  """`mmjax.losses._l2_normalize`: x * rsqrt(max(|x|^2, eps^2))."""
  return x * torch.rsqrt(x.square().sum(-1, keepdim=True).clamp(min=eps * eps))


def softmax_contrastive_loss(outputs):
  """CLIP: mean of the row and column cross-entropies of the logits."""
  x, y = (_l2_normalize(outputs[k]) for k in ("embedding/image",
                                               "embedding/text"))
  logits = outputs["log_scale"].exp() * x @ y.T
  targets = torch.arange(logits.shape[0], device=logits.device)
  return 0.5 * (F.cross_entropy(logits, targets) +
                F.cross_entropy(logits.T, targets))


def sigmoid_contrastive_loss(outputs):
  """SigLIP: -sum log sigmoid(z_ij (t x_i.y_j + b)) / B, z = 2 I - 1."""
  x, y = (_l2_normalize(outputs[k]) for k in ("embedding/image",
                                               "embedding/text"))
  logits = outputs["log_scale"].exp() * x @ y.T + outputs["bias"]
  labels = 2 * torch.eye(logits.shape[0], device=logits.device) - 1
  return -F.logsigmoid(labels * logits).sum() / x.shape[0]


CONTRASTIVE_LOSSES = {"softmax": softmax_contrastive_loss,
                      "sigmoid": sigmoid_contrastive_loss}


def contrastive_model(specs: dict, image_size: int, embed_dim: int,
                      objective: str) -> ContrastiveModel:
  """The twin of mmjax's `ContrastiveModel` for encoder specs {"image":
  {"name": "vit", "pool": "gap", width, depth, mlp_dim, num_heads,
  patch_size}, "text": {"name": "bert", "pool": "mean", vocab_size,
  hidden_size, ...}} (mmjax's config format)."""
  image, text = dict(specs["image"]), dict(specs["text"])
  if (image.pop("name"), image.pop("pool", "gap")) != ("vit", "gap"):
    raise ValueError(f"the image tower must be a ViT with pool 'gap': {image}")
  if (text.pop("name"), text.pop("pool", None)) != ("bert", "mean"):
    raise ValueError(f"the text tower must be BERT with pool 'mean': {text}")
  return ContrastiveModel(ViT(image_size=image_size, **image), image["width"],
                          Bert(**text), text["hidden_size"], embed_dim,
                          objective)


# ----------------------------------------------------------------- fusion --


class PerceiverResampler(nn.Module):
  """`mmjax.models.fusion.PerceiverResampler`: [B, T, S, D] -> [B, L, D]."""

  def __init__(self, dim: int, *, num_latents: int, num_layers: int,
               num_heads: int, mlp_dim: int, max_frames: int):
    super().__init__()
    self.time_embedding = nn.Parameter(0.02 * torch.randn(max_frames, 1, dim))
    self.latents = nn.Parameter(0.02 * torch.randn(num_latents, dim))
    self.num_layers = num_layers
    for i in range(num_layers):
      self.add_module(f"norm_media_{i}", nn.LayerNorm(dim, eps=1e-6))
      self.add_module(f"norm_latents_{i}", nn.LayerNorm(dim, eps=1e-6))
      self.add_module(f"attention_{i}", Attention(dim, num_heads, cross=True))
      self.add_module(f"norm_mlp_{i}", nn.LayerNorm(dim, eps=1e-6))
      self.add_module(f"mlp_{i}", FeedForward(dim, mlp_dim))
    self.norm_out = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, x, mask):
    """x [B, T, S, D]; mask [B, T * S] bool, True at media tokens to see."""
    b, frames = x.shape[:2]
    x = (x + self.time_embedding[:frames]).flatten(1, 2)
    latents = self.latents.expand(b, *self.latents.shape)
    present = torch.cat([mask, mask.new_ones(b, latents.shape[1])], 1)
    attention_mask = key_mask(present)
    for i in range(self.num_layers):
      layer = lambda name: getattr(self, f"{name}_{i}")  # noqa: B023
      queries = layer("norm_latents")(latents)
      kv = torch.cat([layer("norm_media")(x), queries], 1)
      latents = latents + layer("attention")(queries, kv, attention_mask)
      latents = latents + layer("mlp")(layer("norm_mlp")(latents))
    return self.norm_out(latents)


def _zero_masked(x, mask):
  """x [B, ...] with the rows where mask [B] is False set to zero."""
  return torch.where(mask.view(-1, *(1,) * (x.ndim - 1)), x, 0.0)


class PerceiverFusion(nn.Module):
  """`mmjax.models.fusion.PerceiverFusion`: tokens {m: [B, N_m, D_m]},
  masks {m: [B]} -> [B, dim]. Modalities in sorted order, each one frame
  of the resampler, padded with masked tokens to the longest."""

  def __init__(self, widths: dict, dim: int = 64, num_latents: int = 8,
               num_layers: int = 2, num_heads: int = 4,
               mlp_dim: int | None = None):
    super().__init__()
    self.names = sorted(widths)
    for m in self.names:
      self.add_module(f"proj_{m}", nn.Linear(widths[m], dim))
    self.resampler = PerceiverResampler(
        dim, num_latents=num_latents, num_layers=num_layers,
        num_heads=num_heads, mlp_dim=mlp_dim or 4 * dim,
        max_frames=len(self.names))

  def forward(self, tokens, masks):
    length = max(tokens[m].shape[1] for m in self.names)
    frames, present = [], []
    for m in self.names:
      x = getattr(self, f"proj_{m}")(_zero_masked(tokens[m], masks[m]))
      pad = length - x.shape[1]
      frames.append(F.pad(x, (0, 0, 0, pad)))
      keep = masks[m][:, None].expand(x.shape[0], x.shape[1])
      present.append(torch.cat([keep, keep.new_zeros(x.shape[0], pad)], 1))
    latents = self.resampler(torch.stack(frames, 1), torch.cat(present, 1))
    return latents.mean(1)


class CoAttentionFusion(nn.Module):
  """`mmjax.models.fusion.CoAttentionFusion` (ViLBERT): two modalities A, B
  in sorted order -> [B, 2 * dim]; `layers` "C" co-attention (post-LN
  cross-attention each way), "T" a post-LN self-attention layer per stream;
  mean pooling."""

  def __init__(self, widths: dict, dim: int = 64, num_heads: int = 4,
               layers: str = "CT", mlp_dim: int = 128):
    super().__init__()
    self.names, self.layers = sorted(widths), layers
    for m in self.names:
      self.add_module(f"proj_{m}", nn.Linear(widths[m], dim))
    for i, kind in enumerate(layers):
      for m in self.names:
        name = f"layer_{i}_{'co' if kind == 'C' else 'self'}_{m}"
        self.add_module(name, TransformerBlock(
            dim, num_heads, mlp_dim, post_norm=True, eps=1e-6,
            cross=kind == "C"))

  def forward(self, tokens, masks):
    a, b = self.names
    xa = getattr(self, f"proj_{a}")(tokens[a])
    xb = getattr(self, f"proj_{b}")(tokens[b])
    for i, kind in enumerate(self.layers):
      block = lambda m, k: getattr(self, f"layer_{i}_{k}_{m}")  # noqa: B023
      if kind == "C":
        xa, xb = (block(a, "co")(xa, xb, masks[b]),
                  block(b, "co")(xb, xa, masks[a]))
      else:
        xa, xb = block(a, "self")(xa), block(b, "self")(xb)
    return torch.cat([_zero_masked(xa.mean(1), masks[a]),
                      _zero_masked(xb.mean(1), masks[b])], -1)


class MLP(nn.Module):
  """`mmjax.models.layers.MLP`: Linear layers with ReLU between them."""

  def __init__(self, widths):
    super().__init__()
    self.count = len(widths) - 1
    for i in range(self.count):
      self.add_module(f"dense_{i}", nn.Linear(widths[i], widths[i + 1]))

  def forward(self, x):
    for i in range(self.count):
      x = getattr(self, f"dense_{i}")(x)
      if i < self.count - 1:
        x = F.relu(x)
    return x


class TokenClassifier(nn.Module):
  """`MultimodalClassifier` on precomputed tokens (identity encoders): batch
  {m: [B, N_m, D_m] float, "mask/<m>": [B] bool} -> fusion -> MLP head ->
  logits [B, K]."""

  def __init__(self, fusion: nn.Module, fused_width: int, head_hidden,
               num_classes: int):
    super().__init__()
    self.fusion = fusion
    self.head = MLP((fused_width, *head_hidden, num_classes))

  def forward(self, batch):
    names = self.fusion.names
    return self.head(self.fusion({m: batch[m] for m in names},
                                 {m: batch[f"mask/{m}"] for m in names}))


# -------------------------------------------------------- mmjax's weights --


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if hasattr(value, "items"):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), np.asarray(value, np.float32)


def flax_state_dict(params, model: nn.Module) -> dict:
  """mmjax's (Flax) parameter tree as `model`'s state dict: Dense kernels
  [in, out] transposed, a Conv kernel [h, w, in, out] to [out, in, h, w],
  attention's query/key/value kernels [D, H, Dh] flattened over heads (and
  concatenated into `qkv` or `kv` as `model` has them), LayerNorm scale to
  weight, Embed embedding to weight, other parameters as they are."""
  target = model.state_dict()
  out, attention = {}, {}
  for path, value in _flatten(params):
    *parents, leaf = path
    if len(parents) >= 2 and parents[-1] in ("query", "key", "value", "out"):
      prefix, part = ".".join(parents[:-1]), parents[-1]
      if part == "out":  # [H, Dh, D] -> [D, H * Dh]; bias [D]
        out[f"{prefix}.out.{'weight' if leaf == 'kernel' else 'bias'}"] = (
            value.reshape(-1, value.shape[-1]).T if leaf == "kernel"
            else value)
      else:  # [D, H, Dh] -> [H * Dh, D]; bias [H, Dh] -> [H * Dh]
        attention.setdefault(prefix, {})[(part, leaf)] = (
            value.reshape(value.shape[0], -1).T if leaf == "kernel"
            else value.reshape(-1))
      continue
    name = ".".join(parents)
    if leaf == "kernel":
      out[f"{name}.weight"] = (value.transpose(3, 2, 0, 1) if value.ndim == 4
                               else value.T)
    elif leaf in ("scale", "embedding"):
      out[f"{name}.weight"] = value
    elif leaf == "bias" and parents:
      out[f"{name}.bias"] = value
    else:
      out[".".join(path)] = value
  for prefix, parts in attention.items():
    for leaf, torch_leaf in (("kernel", "weight"), ("bias", "bias")):
      q, k, v = (parts[(p, leaf)] for p in ("query", "key", "value"))
      if f"{prefix}.qkv.{torch_leaf}" in target:
        out[f"{prefix}.qkv.{torch_leaf}"] = np.concatenate([q, k, v])
      else:
        out[f"{prefix}.query.{torch_leaf}"] = q
        out[f"{prefix}.kv.{torch_leaf}"] = np.concatenate([k, v])
  missing, unexpected = set(target) - set(out), set(out) - set(target)
  if missing or unexpected:
    raise ValueError(f"parameters do not correspond: missing in mmjax's "
                     f"{sorted(missing)}, not in PyTorch's "
                     f"{sorted(unexpected)}")
  state = {}
  for key, value in out.items():
    if tuple(value.shape) != tuple(target[key].shape):
      raise ValueError(f"{key}: mmjax {value.shape}, PyTorch "
                       f"{tuple(target[key].shape)}")
    state[key] = torch.from_numpy(np.array(value, np.float32))  # a copy
  return state


def load_flax_params(model: nn.Module, params) -> nn.Module:
  """Copies mmjax's parameters into `model` (`flax_state_dict`)."""
  model.load_state_dict(flax_state_dict(params, model))
  return model


# ------------------------------------------------------------------- step --


def no_decay(name: str, module: nn.Module) -> bool:
  """mmjax's `optimizer.no_decay` ".*(bias|scale)": biases, LayerNorm scales
  (torch's LayerNorm `weight`), the logit scale and SigLIP's bias."""
  return name.endswith(("bias", "scale")) or isinstance(module, nn.LayerNorm)


class TorchStep:
  """One AdamW step (lr 1e-3, weight decay 1e-4 except `no_decay`, as
  mmjax's configs) of `loss_fn(model(batch))` on a fixed batch: zero_grad,
  forward, backward, update, and with `clamp_log_scale` CLIP's clamp of the
  logit scale to [0, log 100] (as mmjax's optimizer); `run()` per step."""

  def __init__(self, model: nn.Module, batch, loss_fn,
               clamp_log_scale: bool = False):
    self.model, self.batch, self.loss_fn = model, batch, loss_fn
    self.clamp_log_scale = clamp_log_scale
    decay, keep = [], []
    for _, module in model.named_modules():
      for name, p in module.named_parameters(recurse=False):
        (keep if no_decay(name, module) else decay).append(p)
    groups = [{"params": decay, "weight_decay": 1e-4},
              {"params": keep, "weight_decay": 0.0}]
    try:  # PyTorch's fastest AdamW: one fused kernel over all parameters
      self.optimizer = torch.optim.AdamW(groups, lr=1e-3, fused=True)
    except (RuntimeError, TypeError):  # no fused AdamW for this device
      self.optimizer = torch.optim.AdamW(groups, lr=1e-3, foreach=True)
    self.num_params = sum(p.numel() for p in model.parameters())

  def run(self):
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss_fn(self.model(self.batch))
    loss.backward()
    self.optimizer.step()
    if self.clamp_log_scale:
      with torch.no_grad():
        self.model.log_scale.clamp_(0.0, math.log(100.0))
    return loss.detach()
