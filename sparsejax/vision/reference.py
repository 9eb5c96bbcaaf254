"""Dense jnp definitions of the vision ops (small sizes: they form L x L).

Each builds the visibility and bias of every (query, key) pair from token
coordinates alone, exactly as the papers and official code state them, and
runs masked softmax attention in at least f32 (f64 inputs stay f64, which
the tests use as ground truth). Nothing here is shared with the fast paths
except the BiFormer route table (`routing.route`), which is part of the
op's definition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.vision import natten
from sparsejax.vision import routing


def dense_attention(q, k, v, visible, bias, scale):
  """q, k, v [B, L, H, D]; visible bool [B|1, L, L]; bias [H|1, L, L] | None."""
  dt = jnp.promote_types(q.dtype, jnp.float32)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dt), k.astype(dt),
                 precision=jax.lax.Precision.HIGHEST) * scale
  if bias is not None:
    s = s + bias.astype(dt)[None]
  s = jnp.where(jnp.asarray(visible)[:, None], s, -jnp.inf)
  m = s.max(-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = p.sum(-1, keepdims=True)
  p = p / jnp.where(l > 0, l, 1.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(dt),
                   precision=jax.lax.Precision.HIGHEST)
  return out.astype(q.dtype)


def _flat(x, ndim):
  return x.reshape(x.shape[0], -1, *x.shape[1 + ndim:])


def _window_coords(kind, shape, window):
  """Per token (row-major over `shape`): window id and in-window (r, c)."""
  if kind == "contiguous":  # shape (nW, T)
    t = np.arange(shape[0] * shape[1])
    pos = t % shape[1]
    return t // shape[1], pos // window[1], pos % window[1]
  (x, y), (p1, p2) = shape, window
  h, w = np.divmod(np.arange(x * y), y)
  if kind == "block":
    win = (h // p1) * (y // p2) + w // p2
    return win, h % p1, w % p2
  s1, s2 = x // p1, y // p2  # grid: group = offset in the s1 x s2 lattice
  return (h % s1) * s2 + w % s2, h // s1, w // s2


def window_reference(q, k, v, kind, window, table, scale):
  """MaxViT block / grid (or pre-partitioned) attention with TF's bias.

  q, k, v: [B, X, Y, H, D] ("block", "grid") or [B, nW, T, H, D]
  ("contiguous"); table [H|1, 2P1-1, 2P2-1] or None, added as
  table[n, x - i + P1 - 1, y - j + P2 - 1] for query (i, j), key (x, y).
  """
  shape = q.shape[1:3]
  win, r, c = _window_coords(kind, shape, window)
  visible = (win[:, None] == win[None])[None]
  bias = None
  if table is not None:
    bias = table[:, r[None] - r[:, None] + window[0] - 1,
                 c[None] - c[:, None] + window[1] - 1]
  out = dense_attention(_flat(q, 2), _flat(k, 2), _flat(v, 2), visible, bias,
                        scale)
  return out.reshape(q.shape)


def neighborhood_reference(q, k, v, kernel, dilation, causal, table, scale):
  """NATTEN neighborhood attention on [B, *map, H, D] (1-D or 2-D map)."""
  shape = q.shape[1:-2]
  n = len(shape)
  size = int(np.prod(shape))
  coords = np.unravel_index(np.arange(size), shape)
  visible = np.ones((size, size), bool)
  rel = []
  for a in range(n):
    vis, idx = natten.axis_mask_dense(shape[a], kernel[a], dilation[a],
                                      causal[a])
    visible &= vis[coords[a][:, None], coords[a][None]]
    rel.append(idx[coords[a][:, None], coords[a][None]])
  bias = None if table is None else table[(slice(None),) + tuple(rel)]
  out = dense_attention(_flat(q, n), _flat(k, n), _flat(v, n),
                        visible[None], bias, scale)
  return out.reshape(q.shape)


def routing_reference(q, k, v, num_regions, topk, scale):
  """BiFormer routing attention on [B, X, Y, H, D], dense over tokens."""
  shape = q.shape[1:3]
  region = routing.region_shape(shape, num_regions)
  blocks = routing.routed_blocks(routing.route(q, k, num_regions, topk),
                                 num_regions)  # [B, S^2, S^2]
  h, w = np.divmod(np.arange(shape[0] * shape[1]), shape[1])
  reg = (h // region[0]) * num_regions + w // region[1]
  visible = blocks[:, reg][:, :, reg]
  out = dense_attention(_flat(q, 2), _flat(k, 2), _flat(v, 2), visible, None,
                        scale)
  return out.reshape(q.shape)
