"""Token permutations of the vision ops: explicit, reusable jnp functions.

Images are heads-last `[batch, X, Y, ...]` (any trailing dims: heads,
head_dim, channels). Each partition has an exact inverse:

  window_partition  MaxViT block: token (h, w) -> window (h // P1, w // P2),
                    position (h % P1, w % P2); also BiFormer's regions.
  grid_partition    MaxViT grid: with step (X / G1, Y / G2), token (h, w) ->
                    group (h % (X/G1), w % (Y/G2)), position
                    (h // (X/G1), w // (Y/G2)).
  na_tile_permute   neighborhood attention (NATTEN's Hopper layout):
                    dilation groups first, then (TX, TY) tiles of each
                    group's coordinates, each tile contiguous, padded.

The Triton window kernel reads the image layout directly (the same index
arithmetic, `WindowLayout.rows`), so these are needed only to pre-permute or
for the jnp paths; benchmarks report both.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp

Pair = Union[int, Tuple[int, int]]


def as_pair(value: Pair, name: str) -> Tuple[int, int]:
  """An int or a pair of positive ints as a pair; ValueError naming `name`."""
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2 or not all(isinstance(p, int) and p >= 1 for p in pair):
    raise ValueError(f"{name} must be a positive int or a pair of them, got "
                     f"{value!r}")
  return pair


def _check_divides(shape, window, name):
  x, y = shape
  if x % window[0] or y % window[1]:
    raise ValueError(f"{name} {window} must divide the feature map "
                     f"{(x, y)}")


def window_partition(x: jax.Array, window: Pair) -> jax.Array:
  """[B, X, Y, *rest] -> [B, (X/P1)(Y/P2), P1*P2, *rest] (window-major)."""
  p1, p2 = as_pair(window, "window")
  b, h, w, *rest = x.shape
  _check_divides((h, w), (p1, p2), "window")
  x = x.reshape(b, h // p1, p1, w // p2, p2, *rest)
  x = jnp.moveaxis(x, 3, 2)  # [B, nX, nY, P1, P2, *rest]
  return x.reshape(b, (h // p1) * (w // p2), p1 * p2, *rest)


def window_unpartition(x: jax.Array, window: Pair,
                       shape: Tuple[int, int]) -> jax.Array:
  """Inverse of `window_partition` for a map of `shape` (X, Y)."""
  p1, p2 = as_pair(window, "window")
  b, _, _, *rest = x.shape
  h, w = shape
  x = x.reshape(b, h // p1, w // p2, p1, p2, *rest)
  x = jnp.moveaxis(x, 3, 2)  # [B, nX, P1, nY, P2, *rest]
  return x.reshape(b, h, w, *rest)


def grid_partition(x: jax.Array, grid: Pair) -> jax.Array:
  """[B, X, Y, *rest] -> [B, (X/G1)(Y/G2), G1*G2, *rest] (grid-major)."""
  g1, g2 = as_pair(grid, "grid")
  b, h, w, *rest = x.shape
  _check_divides((h, w), (g1, g2), "grid")
  x = x.reshape(b, g1, h // g1, g2, w // g2, *rest)
  x = jnp.transpose(x, (0, 2, 4, 1, 3, *range(5, x.ndim)))
  return x.reshape(b, (h // g1) * (w // g2), g1 * g2, *rest)


def grid_unpartition(x: jax.Array, grid: Pair,
                     shape: Tuple[int, int]) -> jax.Array:
  """Inverse of `grid_partition` for a map of `shape` (X, Y)."""
  g1, g2 = as_pair(grid, "grid")
  b, _, _, *rest = x.shape
  h, w = shape
  x = x.reshape(b, h // g1, w // g2, g1, g2, *rest)
  x = jnp.transpose(x, (0, 3, 1, 4, 2, *range(5, x.ndim)))
  return x.reshape(b, h, w, *rest)


@dataclasses.dataclass(frozen=True)
class WindowLayout:
  """Where window w's token t lives in the flattened [B*X*Y] token order.

  kind "block" or "grid" reads an image [B, X, Y, ...] in place (the
  partition fused into the kernel's loads); "contiguous" reads a
  pre-partitioned [B*nW, T, ...] array. `window` is (P1, P2): the window
  shape (block) or the grid shape (grid). Pure index arithmetic with
  truncating lax.div/rem on non-negative ints, so Pallas kernels use it too.
  """
  kind: str
  map_shape: Tuple[int, int]
  window: Tuple[int, int]

  def __post_init__(self):
    if self.kind not in ("block", "grid", "contiguous"):
      raise ValueError(f"kind must be block, grid or contiguous, got "
                       f"{self.kind!r}")

  @property
  def tokens(self) -> int:
    return self.window[0] * self.window[1]

  @property
  def windows_per_image(self) -> int:
    return (self.map_shape[0] // self.window[0]) * (
        self.map_shape[1] // self.window[1])

  def rows(self, w, t):
    """Row of window w, position t (int32 arrays broadcast together)."""
    div, rem = jax.lax.div, jax.lax.rem
    i32 = lambda v: jnp.asarray(v, jnp.int32)
    w, t = i32(w), i32(t)
    if self.kind == "contiguous":
      return w * self.tokens + t
    (x, y), (p1, p2) = self.map_shape, self.window
    nw = self.windows_per_image
    b, wi = div(w, i32(nw)), rem(w, i32(nw))
    r, c = div(t, i32(p2)), rem(t, i32(p2))
    if self.kind == "block":
      ny = y // p2
      hh = div(wi, i32(ny)) * p1 + r
      ww = rem(wi, i32(ny)) * p2 + c
    else:  # grid: group (gx, gy) of the (X/P1, Y/P2) lattice offsets
      sx, sy = x // p1, y // p2
      hh = r * sx + div(wi, i32(sy))
      ww = c * sy + rem(wi, i32(sy))
    return (b * x + hh) * y + ww


# --- neighborhood attention tiles -------------------------------------------


def group_lengths(length: int, dilation: int) -> Tuple[int, ...]:
  """Lengths of the `dilation` groups x % d == g of an axis of `length`."""
  return tuple(len(range(g, length, dilation)) for g in range(dilation))


@dataclasses.dataclass(frozen=True)
class TileLayout:
  """NATTEN-style permutation of a 1-D/2-D token map into contiguous tiles.

  Per axis: dilation groups (x % d), each group's coordinate x // d padded
  to a multiple of the tile. Permuted order: [*groups, *tile indices,
  *in-tile offsets], so a tile of prod(tile) tokens is contiguous and every
  tile holds one dilation group. Padded positions (coordinate >= the
  group's length) carry zeros; masks treat them as absent.
  """
  shape: Tuple[int, ...]     # map (L,) or (X, Y)
  dilation: Tuple[int, ...]
  tile: Tuple[int, ...]

  @property
  def padded_group(self) -> Tuple[int, ...]:
    """Per axis: the padded group length (a multiple of the tile)."""
    return tuple(-(-(-(-n // d)) // t) * t for n, d, t in
                 zip(self.shape, self.dilation, self.tile))

  @property
  def tiles(self) -> Tuple[int, ...]:
    return tuple(p // t for p, t in zip(self.padded_group, self.tile))

  @property
  def tile_size(self) -> int:
    out = 1
    for t in self.tile:
      out *= t
    return out

  @property
  def length(self) -> int:
    """Permuted (padded) sequence length."""
    out = 1
    for d, p in zip(self.dilation, self.padded_group):
      out *= d * p
    return out

  def decode(self, idx):
    """Permuted index -> per axis (group, coordinate in group), int32."""
    div, rem = jax.lax.div, jax.lax.rem
    i32 = lambda v: jnp.asarray(v, jnp.int32)
    idx = i32(idx)
    n = len(self.shape)
    offs, tiles_ = [None] * n, [None] * n
    for a in reversed(range(n)):  # in-tile offsets, last axis fastest
      offs[a] = rem(idx, i32(self.tile[a]))
      idx = div(idx, i32(self.tile[a]))
    for a in reversed(range(n)):
      tiles_[a] = rem(idx, i32(self.tiles[a]))
      idx = div(idx, i32(self.tiles[a]))
    groups = [None] * n
    for a in reversed(range(n)):
      groups[a] = rem(idx, i32(self.dilation[a]))
      idx = div(idx, i32(self.dilation[a]))
    return [(groups[a], tiles_[a] * self.tile[a] + offs[a]) for a in range(n)]


def _axis_positions(length, dilation, padded):
  """[d, padded] original coordinate of (group, coordinate); -1 if padded."""
  g = jnp.arange(dilation)[:, None]
  c = jnp.arange(padded)[None, :]
  pos = c * dilation + g
  return jnp.where(pos < length, pos, -1)


def na_tile_permute(x: jax.Array, layout: TileLayout) -> jax.Array:
  """[B, *map, *rest] -> [B, layout.length, *rest] in tile order (zeros pad)."""
  n = len(layout.shape)
  b = x.shape[0]
  rest = x.shape[1 + n:]
  if tuple(x.shape[1:1 + n]) != tuple(layout.shape):
    raise ValueError(f"x map {x.shape[1:1 + n]} does not match the layout "
                     f"{layout.shape}")
  pads = [(0, d * p - s) for s, d, p in
          zip(layout.shape, layout.dilation, layout.padded_group)]
  x = jnp.pad(x, [(0, 0)] + pads + [(0, 0)] * len(rest))
  # Position (t * tile + o) * d + g of each axis -> axes (t, o, g).
  split = []
  for a in range(n):
    split += [layout.tiles[a], layout.tile[a], layout.dilation[a]]
  x = x.reshape(b, *split, *rest)
  order = ([1 + 3 * a + 2 for a in range(n)] + [1 + 3 * a for a in range(n)]
           + [1 + 3 * a + 1 for a in range(n)])
  x = jnp.transpose(x, [0, *order, *range(1 + 3 * n, x.ndim)])
  return x.reshape(b, layout.length, *rest)


def na_tile_unpermute(x: jax.Array, layout: TileLayout) -> jax.Array:
  """Inverse of `na_tile_permute`: [B, layout.length, *rest] -> the map."""
  n = len(layout.shape)
  b, rest = x.shape[0], x.shape[2:]
  x = x.reshape(b, *layout.dilation, *layout.tiles, *layout.tile, *rest)
  # axes: B, d..., t..., o..., rest -> B, [t_a, o_a, d_a] per axis, rest
  order = []
  for a in range(n):
    order += [1 + n + a, 1 + 2 * n + a, 1 + a]
  x = jnp.transpose(x, [0, *order, *range(1 + 3 * n, x.ndim)])
  shape = [b]
  for a in range(n):
    shape.append(layout.padded_group[a] * layout.dilation[a])
  x = x.reshape(*shape, *rest)
  return x[(slice(None),) + tuple(slice(0, s) for s in layout.shape)]


def flatten_map(x: jax.Array, ndim: int) -> jax.Array:
  """[B, *map(ndim), *rest] -> [B, prod(map), *rest] (row-major)."""
  b = x.shape[0]
  size = 1
  for s in x.shape[1:1 + ndim]:
    size *= s
  return x.reshape(b, size, *x.shape[1 + ndim:])


def unflatten_map(x: jax.Array, shape: Sequence[int]) -> jax.Array:
  return x.reshape(x.shape[0], *shape, *x.shape[2:])
