"""impl="xla" paths of the vision ops in plain jnp (any backend).

Window attention (MaxViT block / grid): partition, per-window dense
attention in f32 with the bias tile added, unpartition. Memory is
O(N * T) for windows of T tokens: never L x L. Autodiff gives the backward
(the bias gradient is the transpose of `relative_bias.bias_matrix`'s einsum:
deterministic).

Neighborhood attention with a relative bias: each query gathers its
prod(kernel) keys (the NA definition read directly), in chunks of queries
under `jax.checkpoint`, so memory stays O(chunk * prod(kernel) * d). Without
a bias NA runs through the block-sparse core instead (see
implementations.py), which is O(N d).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.vision import natten
from sparsejax.vision import permute

_PARTITION = {
    "block": (permute.window_partition, permute.window_unpartition),
    "grid": (permute.grid_partition, permute.grid_unpartition),
}


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def window_attention(q, k, v, layout: permute.WindowLayout, bias, scale):
  """q, k, v: [B, X, Y, H, D] (block/grid) or [B, nW, T, H, D]; bias
  [H|1, T, T] f32 or None. Returns the output in q's layout and dtype."""
  if layout.kind != "contiguous":
    part, unpart = _PARTITION[layout.kind]
    q, k, v = (part(x, layout.window) for x in (q, k, v))
  prec = _precision(q.dtype)
  s = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k, precision=prec,
                 preferred_element_type=jnp.float32) * scale
  if bias is not None:
    s = s + bias
  p = jax.nn.softmax(s, axis=-1)
  out = jnp.einsum("bwhqk,bwkhd->bwqhd", p.astype(v.dtype), v, precision=prec,
                   preferred_element_type=jnp.float32).astype(q.dtype)
  if layout.kind != "contiguous":
    out = unpart(out, layout.window, layout.map_shape)
  return out


def _axis_candidates(length, kernel, dilation, causal):
  """Per query position: its K candidate key positions, validity, bias index."""
  pos = np.arange(length)
  g, c = pos % dilation, pos // dilation
  lg = np.array([len(range(x, length, dilation)) for x in g])
  lo, _ = natten.window_bounds(c, lg, kernel, causal, np)
  kc = lo[:, None] + np.arange(kernel)[None]
  valid = (kc >= 0) & (kc < lg[:, None])
  if causal:
    valid &= kc <= c[:, None]
  keys = np.where(valid, kc * dilation + g[:, None], 0)
  rel = np.where(valid, kc - c[:, None] + kernel - 1, 0)
  return keys, valid, rel


def neighborhood_attention(q, k, v, kernel, dilation, causal, table, scale,
                           chunk_keys: int = 1 << 16):
  """NA with an optional bias by per-query gathers. q [B, *map, H, D]."""
  shape = q.shape[1:-2]
  n = len(shape)
  cands = [_axis_candidates(shape[a], kernel[a], dilation[a], causal[a])
           for a in range(n)]
  size = int(np.prod(shape))
  # Outer product over axes: flat key index, validity, per-axis bias index.
  coords = np.unravel_index(np.arange(size), shape)
  keys = np.zeros((size, 1), np.int64)
  valid = np.ones((size, 1), bool)
  rels = []
  for a, (ck, cv, cr) in enumerate(cands):
    ka, va, ra = ck[coords[a]], cv[coords[a]], cr[coords[a]]  # [size, K_a]
    keys = (keys[:, :, None] * shape[a] + ka[:, None, :]).reshape(size, -1)
    valid = (valid[:, :, None] & va[:, None, :]).reshape(size, -1)
    rels = [np.repeat(r, kernel[a], axis=1) for r in rels]
    rels.append(np.tile(ra, (1, int(np.prod(kernel[:a])) or 1)))
  b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
  qf = q.reshape(b, size, h, d)
  kf, vf = k.reshape(b, size, h, d), v.reshape(b, size, h, d)
  chunk = max(1, min(size, chunk_keys // keys.shape[1]))
  n_chunks = -(-size // chunk)
  pad = n_chunks * chunk - size
  padded = lambda x: np.pad(x, ((0, pad), (0, 0))).reshape(n_chunks, chunk, -1)
  keys_c, valid_c = padded(keys), padded(valid)
  rels_c = [padded(r) for r in rels]
  q_c = jnp.pad(qf, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(
      b, n_chunks, chunk, h, d)
  prec = _precision(q.dtype)

  @jax.checkpoint
  def one(args):
    qc, key_idx, vis, *rel = args
    kg, vg = kf[:, key_idx], vf[:, key_idx]  # [B, chunk, KK, H, D]
    s = jnp.einsum("bqhd,bqkhd->bhqk", qc, kg, precision=prec,
                   preferred_element_type=jnp.float32) * scale
    if table is not None:
      s = s + table[(slice(None),) + tuple(rel)].astype(jnp.float32)[None]
    s = jnp.where(vis[None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bqkhd->bqhd", p.astype(v.dtype), vg,
                      precision=prec,
                      preferred_element_type=jnp.float32).astype(q.dtype)

  out = jax.lax.map(one, (jnp.moveaxis(q_c, 1, 0), jnp.asarray(keys_c),
                          jnp.asarray(valid_c),
                          *[jnp.asarray(r) for r in rels_c]))
  out = jnp.moveaxis(out, 0, 1).reshape(b, n_chunks * chunk, h, d)[:, :size]
  return out.reshape(q.shape)

