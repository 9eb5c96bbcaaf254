"""Neighborhood attention semantics (NATTEN), as index arithmetic and blocks.

Per axis of length L with kernel K, dilation d and the causal flag (NATTEN's
`get_na_flex_mask` with stride 1):
- dilation: token x is in group x % d at coordinate c = x // d; q and kv must
  share the group; the group's length is L_g = ceil((L - g) / d).
- non-causal: left = K // 2, right = K // 2 + K % 2 - 1 (even K: K/2 before,
  K/2 - 1 after); center = clamp(c, left, L_g - 1 - right); keys
  center - left <= k <= center + right: the window is shifted, not cut, at
  the borders, so every query sees exactly K keys (needs K * d <= L).
- causal: keys k <= c with c - k < K.
A multi-axis mask is the AND over axes. The relative bias index of a visible
pair is k - c + K - 1 per axis (key minus query, in group coordinates).

`NeighborhoodMask` evaluates this on `permute.TileLayout` indices for the
block-sparse kernels; `block_states` classifies (q tile, kv tile) pairs
analytically (windows are monotone in c), never forming the L x L matrix.
`NeighborhoodBias` is the relative bias as a score mod on the same indices,
so the core's kernels add it (and sum its gradient) in registers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.block_sparse import score_mods
from sparsejax.block_sparse.block_mask import BlockMask, EMPTY, FULL, PARTIAL
from sparsejax.vision.permute import TileLayout


def window_bounds(c, length, kernel: int, causal: bool, xp=jnp):
  """First and last visible key coordinate for query coordinate c."""
  if causal:
    return c - (kernel - 1), c
  left = kernel // 2
  right = kernel // 2 + kernel % 2 - 1
  center = xp.minimum(xp.maximum(c, left), length - 1 - right)
  return center - left, center + right


def _group_length(length: int, dilation: int, g):
  # ceil((L - g) / d) on non-negative ints, truncating division.
  return jax.lax.div(jnp.asarray(length + dilation - 1, jnp.int32) - g,
                     jnp.int32(dilation))


@dataclasses.dataclass(frozen=True)
class NeighborhoodMask:
  """mask_fn(b, h, q, kv) on tile-permuted token indices (see TileLayout)."""
  layout: TileLayout
  kernel: Tuple[int, ...]
  causal: Tuple[bool, ...]

  def __call__(self, b, h, q, kv):
    del b, h
    out = None
    for a, ((gq, cq), (gk, ck)) in enumerate(zip(self.layout.decode(q),
                                                 self.layout.decode(kv))):
      lg = _group_length(self.layout.shape[a], self.layout.dilation[a], gk)
      lo, hi = window_bounds(cq, lg, self.kernel[a], self.causal[a])
      vis = (gq == gk) & (ck < lg) & (ck >= lo) & (ck <= hi)
      out = vis if out is None else out & vis
    return out


# Per-program gradient statistics the kernels keep in registers (the dQ
# carry is a [next_pow2(num_stats)] f32 vector): beyond this, xla.
MAX_KERNEL_BIAS_ENTRIES = 1024


@dataclasses.dataclass(frozen=True)
class NeighborhoodBias(score_mods.ScoreMod):
  """NATTEN's legacy relative bias as a score mod on tile-permuted tokens.

  score + table[h, r_1 (, r_2)] with r_a = ck_a - cq_a + K_a - 1 (key minus
  query in dilation-group coordinates, per axis; `decode` of `layout`). The
  table is stored flat, [heads, prod(2K-1)] row-major: build the mod with
  `NeighborhoodBias.create`. Only pairs of one group inside the window are
  visible (the mask decides that); the offsets are clipped so padded or
  masked pairs read a valid entry.
  """
  table: Any
  layout: TileLayout
  kernel: Tuple[int, ...]
  additive = True

  @classmethod
  def create(cls, table, layout: TileLayout, kernel: Tuple[int, ...],
             heads: int) -> "NeighborhoodBias":
    """From a [heads (or 1), 2K-1(, 2K-1)] table (differentiable)."""
    table = jnp.broadcast_to(jnp.asarray(table, jnp.float32),
                             (heads,) + tuple(table.shape[1:]))
    return cls(table.reshape(heads, -1), layout, tuple(kernel))

  def _offsets(self, q_idx, kv_idx):
    """Per axis: the clipped table coordinate r_a (int32)."""
    out = []
    for a, ((_, cq), (_, ck)) in enumerate(zip(self.layout.decode(q_idx),
                                               self.layout.decode(kv_idx))):
      k = self.kernel[a]
      out.append(jnp.clip(ck - cq + (k - 1), 0, 2 * k - 2))
    return out

  def _flat(self, offsets):
    flat = offsets[0]
    for a in range(1, len(offsets)):
      flat = flat * (2 * self.kernel[a] - 1) + offsets[a]
    return flat

  def __call__(self, score, b, h, q_idx, kv_idx):
    return score + self.table[h, self._flat(self._offsets(q_idx, kv_idx))]

  @property
  def num_stats(self) -> int:
    n = 1
    for k in self.kernel:
      n *= 2 * k - 1
    return n

  def tile_stats(self, g, score, b, h, q_idx, kv_idx, width):
    """Sum of g per table entry. Loops over the offsets the tile holds
    (per axis at most bq + bk - 1, fewer once clipped to the window), each
    a masked reduction; g is 0 wherever the pair is not visible."""
    del score, b, h
    offs = self._offsets(q_idx, kv_idx)
    widths = [2 * k - 1 for k in self.kernel]
    ranges = [(jnp.min(r), jnp.max(r) + 1) for r in offs]
    if len(offs) == 1:
      def one(t, acc):
        return acc + score_mods.bucket(
            width, t, jnp.sum(jnp.where(offs[0] == t, g, 0.0)))
      return jax.lax.fori_loop(*ranges[0], one,
                               jnp.zeros((width,), jnp.float32))

    def row(tx, acc):
      gx = jnp.where(offs[0] == tx, g, 0.0)

      def col(ty, a):
        return a + score_mods.bucket(
            width, tx * widths[1] + ty, jnp.sum(jnp.where(offs[1] == ty, gx,
                                                          0.0)))
      return jax.lax.fori_loop(*ranges[1], col, acc)

    return jax.lax.fori_loop(*ranges[0], row,
                             jnp.zeros((width,), jnp.float32))

  def stats_to_grads(self, stats):
    return (score_mods.tree_sum(stats, 0),)

  def kernel_unsupported(self, impl: str) -> Optional[str]:
    if impl in ("pallas_tpu", "pallas_mosaic_gpu"):
      return (f"the neighborhood bias needs a vector gather (table[h, "
              f"offsets]) that the {impl} kernel lacks; pallas_triton and "
              f"xla take it")
    if self.num_stats > MAX_KERNEL_BIAS_ENTRIES:
      return (f"the bias table has {self.num_stats} entries per head; the "
              f"kernels sum its gradient per program in registers, at most "
              f"{MAX_KERNEL_BIAS_ENTRIES} (impl='xla' takes any kernel)")
    return None


def _axis_states(length, dilation, tile, tiles, kernel, causal):
  """Per axis: int8 [d, tiles, tiles] states of (q tile, kv tile) pairs."""
  out = np.zeros((dilation, tiles, tiles), np.int8)
  for g in range(dilation):
    lg = len(range(g, length, dilation))
    t = np.arange(tiles)
    q_lo, q_hi = t * tile, np.minimum(t * tile + tile, lg) - 1
    k_lo, k_hi = t * tile, np.minimum(t * tile + tile, lg) - 1
    live_q, live_k = q_lo < lg, k_lo < lg
    lo_first, hi_first = window_bounds(q_lo, lg, kernel, causal, np)
    lo_last, hi_last = window_bounds(q_hi, lg, kernel, causal, np)
    # Windows are monotone in c: their union over the q tile is
    # [lo_first, hi_last]; every query covers [lo_last, hi_first].
    any_ = (hi_last[:, None] >= k_lo[None]) & (lo_first[:, None] <= k_hi[None])
    kv_whole = (k_lo + tile - 1 < lg)[None]  # no padded keys in the tile
    all_ = ((lo_last[:, None] <= k_lo[None]) & (hi_first[:, None] >= k_hi[None])
            & kv_whole)
    live = live_q[:, None] & live_k[None]
    out[g] = np.where(live & any_, np.where(all_, FULL, PARTIAL), EMPTY)
  return out


def block_mask(layout: TileLayout, kernel: Tuple[int, ...],
               causal: Tuple[bool, ...]) -> BlockMask:
  """The BlockMask of neighborhood attention over `layout`'s token order.

  Blocks are the layout's tiles (prod(tile) tokens). States per axis come
  from window bounds at the tile's first and last query; an N-D pair is
  empty if any axis is, full if all are, partial otherwise; tiles of
  different dilation groups never meet.
  """
  n = len(layout.shape)
  per_axis = [_axis_states(layout.shape[a], layout.dilation[a],
                           layout.tile[a], layout.tiles[a], kernel[a],
                           causal[a]) for a in range(n)]
  # Index order of a tile: (groups..., tiles...), matching TileLayout.
  states = None
  for a, s in enumerate(per_axis):
    # f[g, i, g', j] = s[g, i, j] where g == g' (tiles of one group meet),
    # placed on axes (a, n + a, 2n + a, 3n + a) of the
    # [groups, tiles, groups', tiles'] product.
    d, t = layout.dilation[a], layout.tiles[a]
    f = np.where(np.eye(d, dtype=bool)[:, None, :, None], s[:, :, None, :],
                 EMPTY).astype(np.int8)
    shape = [1] * (4 * n)
    shape[a], shape[n + a], shape[2 * n + a], shape[3 * n + a] = d, t, d, t
    f = f.reshape(shape)
    states = f if states is None else _combine(states, f)
  nq = int(np.prod(layout.dilation)) * int(np.prod(layout.tiles))
  states = np.broadcast_to(
      states, tuple(layout.dilation) + tuple(layout.tiles)
      + tuple(layout.dilation) + tuple(layout.tiles)).reshape(nq, nq)
  bs = layout.tile_size
  return BlockMask.from_states(
      jnp.asarray(states)[None, None], block_q=bs, block_kv=bs,
      q_len=layout.length, kv_len=layout.length,
      mask_fn=NeighborhoodMask(layout, tuple(kernel), tuple(causal)))


def _combine(a, b):
  empty = (a == EMPTY) | (b == EMPTY)
  full = (a == FULL) & (b == FULL)
  return np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)


# --- dense definitions (reference, tests) -----------------------------------


def axis_mask_dense(length, kernel, dilation, causal):
  """bool [L, L] of one axis, and the int32 [L, L] relative bias index."""
  pos = np.arange(length)
  g, c = pos % dilation, pos // dilation
  lg = np.array([len(range(x, length, dilation)) for x in g])
  lo, hi = window_bounds(c, lg, kernel, causal, np)
  vis = ((g[:, None] == g[None]) & (c[None] >= lo[:, None])
         & (c[None] <= hi[:, None]))
  rel = c[None] - c[:, None] + kernel - 1
  return vis, np.where(vis, rel, 0)
