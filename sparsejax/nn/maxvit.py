"""MaxViT (Tu et al., ECCV 2022) in Flax NNX, on sj.vision block/grid attention.

images [B, H, W, C] -> stem (two 3x3 convs, the first strided) -> stages of
MaxViT blocks -> mean pool -> LayerNorm -> logits. A block (as timm's
MaxxVitBlock and google-research/maxvit's MaxViTBlock) is
  MBConv (pre-norm, 1x1 expand, depthwise 3x3 (strided in a stage's first
  block), squeeze-excite 0.25, 1x1 project; pooled 1x1 shortcut)
  -> x + BlockAttn(LN(x)) -> x + FFN(LN(x))
  -> x + GridAttn(LN(x))  -> x + FFN(LN(x)),
each attention with its own TF-layout relative bias [heads, 2P-1, 2P-1].
Norms are LayerNorms (the original MBConv uses BatchNorm; LayerNorm keeps the
model free of batch statistics). MaxViT-T: widths 64/128/256/512, depths
2/2/5/2, head size 32, window = grid = 7 at 224.
"""

from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

import sparsejax as sj


class MBConv(nnx.Module):
  """Inverted bottleneck with squeeze-excite; stride 1 or 2."""

  def __init__(self, cin, cout, stride, *, expand=4, rngs):
    hidden = cin * expand
    self.norm = nnx.LayerNorm(cin, rngs=rngs)
    self.expand = nnx.Conv(cin, hidden, (1, 1), rngs=rngs)
    self.dw = nnx.Conv(hidden, hidden, (3, 3), strides=stride, padding="SAME",
                       feature_group_count=hidden, rngs=rngs)
    se = max(1, cin // 4)
    self.se_reduce = nnx.Linear(hidden, se, rngs=rngs)
    self.se_expand = nnx.Linear(se, hidden, rngs=rngs)
    self.project = nnx.Conv(hidden, cout, (1, 1), rngs=rngs)
    self.stride = stride
    self.shortcut = (nnx.Conv(cin, cout, (1, 1), rngs=rngs)
                     if cin != cout else None)

  def __call__(self, x):
    y = jax.nn.gelu(self.expand(self.norm(x)))
    y = jax.nn.gelu(self.dw(y))
    gate = jax.nn.sigmoid(self.se_expand(jax.nn.silu(
        self.se_reduce(y.mean((1, 2))))))
    y = self.project(y * gate[:, None, None])
    s = x
    if self.stride > 1:
      s = nnx.avg_pool(s, (self.stride, self.stride), (self.stride,
                                                      self.stride))
    if self.shortcut is not None:
      s = self.shortcut(s)
    return s + y


class PartitionAttention(nnx.Module):
  """Multi-head block or grid attention on [B, X, Y, C] with its own bias."""

  def __init__(self, dim, head_dim, window, kind, *, impl, rngs):
    self.heads, self.head_dim = dim // head_dim, head_dim
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)
    self.rel_bias = nnx.Param(nnx.initializers.normal(0.02)(
        rngs.params(), (self.heads, 2 * window - 1, 2 * window - 1)))
    self.window, self.kind, self.impl = window, kind, impl

  def __call__(self, x):
    b, h, w, c = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, h, w, 3, self.heads,
                                            self.head_dim), 3, axis=3)
    op = (sj.vision.block_attention if self.kind == "block"
          else sj.vision.grid_attention)
    out = op(q[:, :, :, 0], k[:, :, :, 0], v[:, :, :, 0], self.window,
             rel_bias=self.rel_bias[...], impl=self.impl)
    return self.out(out.reshape(b, h, w, c))


class FFN(nnx.Module):
  def __init__(self, dim, ratio, *, rngs):
    self.up = nnx.Linear(dim, dim * ratio, rngs=rngs)
    self.down = nnx.Linear(dim * ratio, dim, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


class MaxViTBlock(nnx.Module):
  def __init__(self, cin, cout, stride, *, head_dim, window, impl, rngs):
    self.mbconv = MBConv(cin, cout, stride, rngs=rngs)
    self.norms = nnx.List([nnx.LayerNorm(cout, rngs=rngs) for _ in range(4)])
    self.block = PartitionAttention(cout, head_dim, window, "block",
                                    impl=impl, rngs=rngs)
    self.grid = PartitionAttention(cout, head_dim, window, "grid", impl=impl,
                                   rngs=rngs)
    self.ffn = nnx.List([FFN(cout, 4, rngs=rngs) for _ in range(2)])

  def __call__(self, x):
    x = self.mbconv(x)
    x = x + self.block(self.norms[0](x))
    x = x + self.ffn[0](self.norms[1](x))
    x = x + self.grid(self.norms[2](x))
    return x + self.ffn[1](self.norms[3](x))


def _per_stage(value, n):
  return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


class MaxViT(nnx.Module):
  """images f32 [B, H, W, C] -> logits f32 [B, num_classes].

  window: the partition size P (window = grid) per stage or for all; each
  stage's map must be divisible by it. stem_stride / stage_strides set the
  downsampling (MaxViT: 2 and 2 everywhere: 224 -> 56, 28, 14, 7).
  """

  def __init__(self, *, image_shape, num_classes: int,
               widths: Sequence[int] = (64, 128, 256, 512),
               depths: Sequence[int] = (2, 2, 5, 2), stem_width: int = 64,
               head_dim: int = 32, window: Union[int, Sequence[int]] = 7,
               stem_stride: int = 2, stage_strides: Union[int, Sequence[int]]
               = 2, impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
    height, width, channels = image_shape
    n = len(widths)
    windows, strides = _per_stage(window, n), _per_stage(stage_strides, n)
    self.stem = nnx.List([
        nnx.Conv(channels, stem_width, (3, 3), strides=stem_stride,
                 padding="SAME", rngs=rngs),
        nnx.Conv(stem_width, stem_width, (3, 3), padding="SAME", rngs=rngs)])
    side = (height // stem_stride, width // stem_stride)
    blocks, cin = [], stem_width
    for s, (cout, depth) in enumerate(zip(widths, depths)):
      side = (side[0] // strides[s], side[1] // strides[s])
      if side[0] % windows[s] or side[1] % windows[s]:
        raise ValueError(f"stage {s} map {side} is not divisible by window "
                         f"{windows[s]}")
      for i in range(depth):
        blocks.append(MaxViTBlock(cin, cout, strides[s] if i == 0 else 1,
                                  head_dim=head_dim, window=windows[s],
                                  impl=impl, rngs=rngs))
        cin = cout
    self.blocks = nnx.List(blocks)
    self.norm = nnx.LayerNorm(cin, rngs=rngs)
    self.head = nnx.Linear(cin, num_classes, rngs=rngs)
    self.dtype = dtype
    self.seq_len = height * width  # "tokens" per example, for throughput

  def __call__(self, images):
    x = images.astype(self.dtype)
    x = jax.nn.gelu(self.stem[0](x))
    x = self.stem[1](x)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x.mean((1, 2))).astype(jnp.float32))

  def flops_per_token(self) -> float:
    """Training FLOPs per input pixel (6 x params: a rough convnet proxy)."""
    params = sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
    return 6.0 * params / max(1, self.seq_len)
