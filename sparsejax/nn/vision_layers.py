"""NNX layers of the vision family, registered as attention layer variants.

Each mixes the ViT's token grid (`LayerSpec.grid`, row-major [B, L, d]):
  maxvit_block   MaxViT block attention with its own 2-D relative bias
  maxvit_grid    MaxViT grid attention with its own 2-D relative bias
  neighborhood   NAT-style neighborhood attention (+ relative bias)
  routing        BiFormer bi-level routing attention + LePE (depthwise conv
                 on V), scale (heads * head_dim) ** -0.5 as BiFormer's
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

import sparsejax as sj
from sparsejax.nn import attention_registry
from sparsejax.nn.attention_registry import LayerSpec


def _init(in_axis, out_axis):
  return nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


class GridAttention(nnx.Module):
  """Projections around a grid attention op: x [B, L, d] -> [B, L, d].

  Subclasses set `visible` (keys per query, for FLOPs) and implement
  `mix(q, k, v) -> out` on [B, X, Y, H, D].
  """

  def __init__(self, spec: LayerSpec):
    if spec.grid is None:
      raise ValueError("vision attention variants need LayerSpec.grid (the "
                       "token grid); use them in the ViT")
    d, h, hd = spec.d_model, spec.num_heads, spec.head_dim
    key = spec.rngs.params
    self.wq = nnx.Param(_init(0, (1, 2))(key(), (d, h, hd)))
    self.wk = nnx.Param(_init(0, (1, 2))(key(), (d, h, hd)))
    self.wv = nnx.Param(_init(0, (1, 2))(key(), (d, h, hd)))
    self.wo = nnx.Param(_init((0, 1), 2)(key(), (h, hd, d)))
    self.grid, self.impl, self.dtype = tuple(spec.grid), spec.impl, spec.dtype
    self.num_heads, self.head_dim = h, hd
    self.visible = float(spec.grid[0] * spec.grid[1])

  def mix(self, q, k, v):
    raise NotImplementedError

  def __call__(self, x, positions=None, segment_ids=None):
    del positions
    if segment_ids is not None:
      raise NotImplementedError("segment_ids are not supported by vision "
                                "attention")
    c = lambda p: p[...].astype(self.dtype)
    b = x.shape[0]
    grid = lambda t: t.reshape(b, *self.grid, *t.shape[2:])
    q, k, v = (grid(jnp.einsum("bld,dhk->blhk", x, c(w)))
               for w in (self.wq, self.wk, self.wv))
    out = self.mix(q, k, v).reshape(b, -1, self.num_heads, self.head_dim)
    return jnp.einsum("blhk,hkd->bld", out.astype(self.dtype), c(self.wo))

  def attention_flops_per_token(self, seq_len: int) -> float:
    del seq_len
    return 12.0 * self.num_heads * self.head_dim * self.visible


def _table(spec, shape, rngs):
  return nnx.Param(nnx.initializers.normal(0.02)(
      rngs.params(), (spec.num_heads, *shape)))


class MaxViTAttention(GridAttention):
  """Block (`kind="block"`) or grid attention with a [H, 2P-1, 2P-1] bias."""

  def __init__(self, spec: LayerSpec, *, kind: str, window: int,
               rel_bias: bool = True):
    super().__init__(spec)
    p = sj.vision.permute.as_pair(window, kind)
    self.kind, self.window = kind, p
    self.rel_bias = _table(spec, (2 * p[0] - 1, 2 * p[1] - 1),
                           spec.rngs) if rel_bias else None
    self.visible = float(p[0] * p[1])

  def mix(self, q, k, v):
    op = (sj.vision.block_attention if self.kind == "block"
          else sj.vision.grid_attention)
    table = None if self.rel_bias is None else self.rel_bias[...]
    return op(q, k, v, self.window, rel_bias=table, impl=self.impl)


class NeighborhoodAttention(GridAttention):
  """NAT / DiNAT neighborhood attention, optionally with a relative bias."""

  def __init__(self, spec: LayerSpec, *, kernel_size: int, dilation: int,
               rel_bias: bool):
    super().__init__(spec)
    self.kernel_size, self.dilation = kernel_size, dilation
    self.rel_bias = _table(spec, (2 * kernel_size - 1,) * 2,
                           spec.rngs) if rel_bias else None
    self.visible = float(kernel_size ** 2)

  def mix(self, q, k, v):
    table = None if self.rel_bias is None else self.rel_bias[...]
    return sj.vision.neighborhood_attention(
        q, k, v, self.kernel_size, dilation=self.dilation, rel_bias=table,
        impl=self.impl)


class RoutingAttention(GridAttention):
  """BiFormer bi-level routing attention with LePE on V."""

  def __init__(self, spec: LayerSpec, *, num_regions: int, topk: int,
               lepe_kernel: int, biformer_scale: bool):
    super().__init__(spec)
    self.num_regions, self.topk = num_regions, topk
    channels = spec.num_heads * spec.head_dim
    self.scale: Optional[float] = channels ** -0.5 if biformer_scale else None
    self.lepe = nnx.Conv(channels, channels, (lepe_kernel, lepe_kernel),
                         feature_group_count=channels, padding="SAME",
                         rngs=spec.rngs) if lepe_kernel else None
    region = (spec.grid[0] // num_regions) * (spec.grid[1] // num_regions)
    self.visible = float(topk * region)

  def mix(self, q, k, v):
    out = sj.vision.routing_attention(q, k, v, self.num_regions, self.topk,
                                      scale=self.scale, impl=self.impl)
    if self.lepe is not None:
      b, x, y, h, d = v.shape
      out = out + self.lepe(v.reshape(b, x, y, h * d)).reshape(v.shape)
    return out


@attention_registry.register_layer("maxvit_block")
def _maxvit_block(spec: LayerSpec, *, window=4, rel_bias=True):
  return MaxViTAttention(spec, kind="block", window=window, rel_bias=rel_bias)


@attention_registry.register_layer("maxvit_grid")
def _maxvit_grid(spec: LayerSpec, *, grid=4, rel_bias=True):
  return MaxViTAttention(spec, kind="grid", window=grid, rel_bias=rel_bias)


@attention_registry.register_layer("neighborhood")
def _neighborhood(spec: LayerSpec, *, kernel_size=3, dilation=1,
                  rel_bias=True):
  return NeighborhoodAttention(spec, kernel_size=kernel_size,
                               dilation=dilation, rel_bias=rel_bias)


@attention_registry.register_layer("routing")
def _routing(spec: LayerSpec, *, num_regions=2, topk=2, lepe_kernel=5,
             biformer_scale=True):
  return RoutingAttention(spec, num_regions=num_regions, topk=topk,
                          lepe_kernel=lepe_kernel,
                          biformer_scale=biformer_scale)


del jax
