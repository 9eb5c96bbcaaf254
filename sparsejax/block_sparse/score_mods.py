"""Score mods: `mod(score, b, h, q_idx, kv_idx) -> score` on visible logits.

A score mod rewrites each visible logit after the scale and before soft-cap
and softmax (FlexAttention's `score_mod`). It is a frozen dataclass that
subclasses `ScoreMod`: its array fields are pytree leaves (so `jax.grad`
returns their cotangents) and every other field is static aux data (hashed
into the jit cache). Kernels evaluate it in registers: inside a Pallas kernel
the array fields are refs, so `self.table[h, idx]` is a gather from the ref
and `self.slopes[h]` a scalar load (index every field: `self.x[()]` for a
0-d one). Arguments broadcast against each other
(scalars b, h and [bq, bk] index tiles in the kernels; [B,1,1,1], [1,H,1,1],
[1,1,Lq,1], [1,1,1,Lk] in the dense reference). Indices may reach the
block-padded lengths: clip them before a lookup.

Gradients to the parameters:
  * reference and xla: autodiff (the xla path sums the per-block vjp over its
    loop), so any mod works there.
  * Pallas kernels: deterministic, no atomics. A mod implements
    `tile_stats(g, score, b, h, q_idx, kv_idx, width) -> f32 [width]`, the
    per-tile partial sums its gradient needs (g = dL/d(mod output) on the
    tile, 0 where not visible; score = the mod's input; width >= num_stats,
    a power of two), and
    `stats_to_grads(stats [B, H, num_stats]) -> tuple of cotangents`, one per
    array leaf in flatten order. Each dQ program sums its tiles' stats in
    registers and writes one row; XLA adds the rows in a fixed order. A mod
    without parameters needs neither.
  * The Mosaic GPU kernel cannot reduce a tile into a [width] vector; it
    sums statistics per query row instead, for mods whose statistics are
    weighted sums of g: `stat_weights(score, b, h, q_idx, kv_idx) -> tuple
    of num_stats arrays w_j` with tile_stats(g, ...)[j] == sum(g * w_j)
    (Alibi: w = -|q_idx - kv_idx|). The per-row sums, [B, H, num_stats,
    Lq], are added over rows in a fixed order and go to `stats_to_grads`.
    The Triton dQ kernel uses them too where a mod has them (one
    multiply-add per element and statistic into a register tile, reduced
    once per program, instead of reducing every tile), through
    `tile_weights` (below).

Tile forms for kernels (optional; the Triton kernels call them with the
tile's corner q_start, kv_start (int32 scalars) and its static size bq, bk,
so a mod can split its work into per-row, per-column and per-element parts
and fold constants; the defaults evaluate the mod on index vectors
q_idx [bq, 1], kv_idx [1, bk]):
  * `tile_bias(factor, b, h, q_start, kv_start, bq, bk, row_offset=None)`:
    additive mods, factor * (mod(s) - s) (+ row_offset [bq, 1] f32: the
    backward passes -lse there), f32 broadcasting to [bq, bk]; factor
    (log2(e) for the base-2 logits) and row_offset can join the mod's
    per-head and per-row terms.
  * `tile_weights(score, b, h, q_start, kv_start, bq, bk)`: the
    `stat_weights` of the tile.

Example (a user-written mod):

  @dataclasses.dataclass(frozen=True)
  class HeadBias(sj.score_mods.ScoreMod):
    bias: jax.Array  # [heads]
    def __call__(self, score, b, h, q_idx, kv_idx):
      return score + self.bias[h]

  out = sj.attention(q, k, v, mask, score_mod=HeadBias(jnp.zeros(4)))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray))


def _flatten(mod):
  leaves, names, static = [], [], []
  for f in dataclasses.fields(mod):
    value = getattr(mod, f.name)
    if _is_array(value):
      names.append(f.name)
      leaves.append(value)
    else:
      static.append((f.name, value))
  return leaves, (tuple(names), tuple(static))


def _unflatten(cls, aux, leaves):
  # Bypasses __init__/__post_init__: inside kernels the leaves are refs.
  names, static = aux
  obj = object.__new__(cls)
  for name, value in zip(names, leaves):
    object.__setattr__(obj, name, value)
  for name, value in static:
    object.__setattr__(obj, name, value)
  return obj


def register(cls):
  """Registers a dataclass score-mod class as a pytree (array fields are
  leaves). `ScoreMod` subclasses are registered automatically."""
  jax.tree_util.register_pytree_node(
      cls, _flatten, lambda aux, leaves: _unflatten(cls, aux, leaves))
  return cls


class ScoreMod:
  """Base class of score mods; subclass it with a frozen dataclass.

  Class attributes:
    additive: d(mod)/d(score) is 1 (a bias), so the backward skips the
      score derivative (else it is taken with jax.jvp, elementwise).
  """
  additive: bool = False

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    register(cls)

  def __call__(self, score, b, h, q_idx, kv_idx):
    raise NotImplementedError

  # --- kernel gradients (optional) -----------------------------------------

  @property
  def num_stats(self) -> int:
    """Length of the `tile_stats` vector (static)."""
    return 0

  def tile_stats(self, g, score, b, h, q_idx, kv_idx, width: int):
    raise NotImplementedError

  def stats_to_grads(self, stats) -> Tuple[Any, ...]:
    raise NotImplementedError

  def stat_weights(self, score, b, h, q_idx, kv_idx) -> Tuple[Any, ...]:
    """Optional: weights w_j (broadcasting against score) with
    tile_stats(g, ...)[j] == sum(g * w_j), j < num_stats (per-row
    statistics; see the module docstring)."""
    raise NotImplementedError

  def tile_bias(self, factor, b, h, q_start, kv_start, bq: int, bk: int,
                row_offset=None):
    """Additive mods: factor * (mod(s) - s) on a tile (module docstring)."""
    bias = factor * self(jnp.float32(0.0), b, h,
                         *tile_coords(q_start, kv_start, bq, bk))
    return bias if row_offset is None else bias + row_offset

  def tile_weights(self, score, b, h, q_start, kv_start, bq: int, bk: int):
    """`stat_weights` on a tile (module docstring)."""
    return self.stat_weights(score, b, h,
                             *tile_coords(q_start, kv_start, bq, bk))

  def kernel_unsupported(self, impl: str) -> Optional[str]:
    """Why Pallas implementation `impl` cannot run this mod, or None."""
    del impl
    return _needs_tile_stats(self)


def _needs_tile_stats(mod) -> Optional[str]:
  has_params = any(jnp.issubdtype(jnp.result_type(x), jnp.floating)
                   for x in jax.tree.leaves(mod))
  own = getattr(type(mod), "tile_stats", ScoreMod.tile_stats)
  if has_params and own is ScoreMod.tile_stats:
    return (f"score mod {type(mod).__name__} has parameters but no "
            "tile_stats/stats_to_grads (the deterministic kernel gradient "
            "protocol, see sparsejax.score_mods); impl='xla' and "
            "'reference' differentiate any mod")
  return None


def has_stat_weights(mod) -> bool:
  """Whether `mod` (ScoreMod or not) defines `stat_weights`."""
  own = getattr(type(mod), "stat_weights", None)
  return own is not None and own is not ScoreMod.stat_weights


def kernel_unsupported(mod, impl: str) -> Optional[str]:
  """Why Pallas implementation `impl` cannot run `mod` (any registered
  dataclass mod, ScoreMod or not), or None."""
  if isinstance(mod, ScoreMod):
    return mod.kernel_unsupported(impl)
  return _needs_tile_stats(mod)


def tile_coords(q_start, kv_start, bq: int, bk: int):
  """Index vectors (q_idx [bq, 1], kv_idx [1, bk]) of a tile."""
  return (q_start + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0),
          kv_start + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1))


def _broadcast_apart(x, y) -> bool:
  """Whether x and y are both smaller than their broadcast (index vectors
  such as [bq, 1] and [1, bk]) rather than full index tiles."""
  full = math.prod(jnp.broadcast_shapes(jnp.shape(x), jnp.shape(y)))
  return math.prod(jnp.shape(x)) < full and math.prod(jnp.shape(y)) < full


def abs_distance(q_idx, kv_idx):
  """|q_idx - kv_idx| in f32 (exact below 2^24). Index vectors are
  converted before they broadcast (one subtraction per element, no
  int->float convert per element); full index tiles are subtracted first
  (one convert per element instead of two)."""
  if _broadcast_apart(q_idx, kv_idx):
    return jnp.abs(jnp.asarray(q_idx, jnp.float32) -
                   jnp.asarray(kv_idx, jnp.float32))
  return jnp.abs(q_idx - kv_idx).astype(jnp.float32)


def offset_range(q_idx, kv_idx):
  """(min, max) of kv_idx - q_idx over a tile. From index vectors it takes
  four vector reductions instead of two over the tile (exact: each extreme
  pairs a row with a column); for other shapes it is a bound with min <= the
  true min and max >= the true max (callers use it conservatively)."""
  if _broadcast_apart(q_idx, kv_idx):
    return (jnp.min(kv_idx) - jnp.max(q_idx),
            jnp.max(kv_idx) - jnp.min(q_idx))
  d = kv_idx - q_idx
  return jnp.min(d), jnp.max(d)


def bucket(width: int, index, value):
  """A [width] f32 vector holding `value` at `index` and 0 elsewhere."""
  iota = jax.lax.broadcasted_iota(jnp.int32, (width,), 0)
  return jnp.where(iota == index, value, 0.0).astype(jnp.float32)


def check(score_mod) -> None:
  """TypeError unless score_mod is None or a registered dataclass mod."""
  if score_mod is None:
    return
  if not callable(score_mod) or not dataclasses.is_dataclass(score_mod):
    raise TypeError(f"score_mod must be None or a frozen dataclass "
                    f"subclassing sparsejax.score_mods.ScoreMod, got "
                    f"{type(score_mod).__name__}")
  leaves = jax.tree.leaves(score_mod)
  if len(leaves) == 1 and leaves[0] is score_mod:  # not a pytree yet
    register(type(score_mod))


def flatten(score_mod):
  """(params, treedef): float leaves as f32 (differentiable), others as is."""
  if score_mod is None:
    return (), None
  check(score_mod)
  leaves, treedef = jax.tree.flatten(score_mod)
  params = tuple(
      jnp.asarray(x, jnp.float32)
      if jnp.issubdtype(jnp.result_type(x), jnp.floating) else jnp.asarray(x)
      for x in leaves)
  return params, treedef


def float_positions(params) -> Tuple[int, ...]:
  """Indices of the differentiable (floating) params."""
  return tuple(i for i, x in enumerate(params)
               if jnp.issubdtype(x.dtype, jnp.floating))


def rebuild(treedef, params):
  """The mod of `treedef` over `params` (arrays or kernel refs); None if
  there is no mod."""
  return None if treedef is None else jax.tree.unflatten(treedef, params)


def tree_sum(x, axis: int):
  """Sum over `axis` by pairwise halving: a fixed order on every backend
  (deterministic parameter gradients)."""
  x = jnp.moveaxis(x, axis, 0)
  n = x.shape[0]
  size = 1 << max(0, (n - 1).bit_length())
  x = jnp.pad(x, [(0, size - n)] + [(0, 0)] * (x.ndim - 1))
  while x.shape[0] > 1:
    x = x[0::2] + x[1::2]
  return x[0]


# --- built-in mods -----------------------------------------------------------


def _abs_offset_tile(k, q_start, kv_start, bq: int, bk: int, row_offset=None):
  """k * |q_idx - kv_idx| (+ row_offset) on a tile, [bq, bk] f32 (exact
  offsets < 2^24).

  q_idx - kv_idx = off + i - j with off = q_start - kv_start. On a tile that
  lies on one side of the diagonal (sign s) this is (k s (off + i)) -
  (k s) j: a per-row term and one multiply-add per element with the
  loop-invariant column iota, no int->float convert or |.| per element;
  tiles crossing the diagonal take |.| per element.
  """
  off = jnp.asarray(q_start - kv_start, jnp.float32)
  rows = off + jax.lax.broadcasted_iota(jnp.float32, (bq, 1), 0)
  cols = jax.lax.broadcasted_iota(jnp.float32, (bq, bk), 1)
  above, below = off >= bk - 1, off <= 1 - bq  # q >= kv, q <= kv throughout
  ks = k * jnp.where(above, jnp.float32(1.0), jnp.float32(-1.0))
  add = (lambda x: x) if row_offset is None else (lambda x: x + row_offset)
  return jax.lax.cond(above | below,
                      lambda: cols * (-ks) + add(ks * rows),
                      lambda: add(k * jnp.abs(rows - cols)))


@dataclasses.dataclass(frozen=True)
class Alibi(ScoreMod):
  """ALiBi: score - slopes[h] * |q_idx - kv_idx|; slopes [heads]."""
  slopes: Any
  additive = True

  def __post_init__(self):
    if getattr(self.slopes, "ndim", None) != 1:
      raise ValueError(f"Alibi slopes must be a 1-D array [heads], got "
                       f"shape {getattr(self.slopes, 'shape', None)}")

  def __call__(self, score, b, h, q_idx, kv_idx):
    return score - self.slopes[h] * abs_distance(q_idx, kv_idx)

  def tile_bias(self, factor, b, h, q_start, kv_start, bq, bk,
                row_offset=None):
    return _abs_offset_tile(-factor * self.slopes[h], q_start, kv_start, bq,
                            bk, row_offset)

  def tile_weights(self, score, b, h, q_start, kv_start, bq, bk):
    return (_abs_offset_tile(jnp.float32(-1.0), q_start, kv_start, bq, bk),)

  @property
  def num_stats(self) -> int:
    return 1

  def tile_stats(self, g, score, b, h, q_idx, kv_idx, width):
    return bucket(width, 0, -jnp.sum(g * abs_distance(q_idx, kv_idx)))

  def stat_weights(self, score, b, h, q_idx, kv_idx):
    return (-abs_distance(q_idx, kv_idx),)

  def stats_to_grads(self, stats):
    return (tree_sum(stats[..., 0], 0),)

  def kernel_unsupported(self, impl):
    return None

  @staticmethod
  def geometric_slopes(num_heads: int):
    """The ALiBi paper's slopes 2^(-8 (h + 1) / H) (exact for H a power of
    two)."""
    return jnp.asarray([2.0 ** (-8.0 * (h + 1) / num_heads)
                        for h in range(num_heads)], jnp.float32)


@dataclasses.dataclass(frozen=True)
class RelativeBias(ScoreMod):
  """A learned 1-D relative-position table [heads, 2W-1]:
  score + table[h, clip(kv_idx - q_idx, -(W-1), W-1) + W-1].

  `window` (W) is derived from the table; offsets beyond it share the end
  entries (T5-style clipping).
  """
  table: Any
  window: int = dataclasses.field(init=False)
  additive = True

  def __post_init__(self):
    shape = getattr(self.table, "shape", None)
    if shape is None or len(shape) != 2 or shape[1] % 2 != 1:
      raise ValueError(f"RelativeBias table must be [heads, 2W-1] (odd "
                       f"width), got shape {shape}")
    object.__setattr__(self, "window", (shape[1] + 1) // 2)

  def _bucket(self, q_idx, kv_idx):
    w = self.window
    return jnp.clip(kv_idx - q_idx, -(w - 1), w - 1) + (w - 1)

  def __call__(self, score, b, h, q_idx, kv_idx):
    return score + self.bias(h, q_idx, kv_idx)

  def tile_bias(self, factor, b, h, q_start, kv_start, bq, bk,
                row_offset=None):
    # The tile's offset range from its corner: no reductions.
    span = (kv_start - (q_start + bq - 1), kv_start + bk - 1 - q_start)
    bias = self.bias(h, *tile_coords(q_start, kv_start, bq, bk), factor,
                     span)
    return bias if row_offset is None else bias + row_offset

  def bias(self, h, q_idx, kv_idx, factor=None, span=None):
    """(factor *) table[h, bucket]; a tile entirely past one end of the
    window reads one entry instead of gathering (most tiles at long
    lengths). span: (min, max) of kv_idx - q_idx if known."""
    w = self.window
    shape = jnp.broadcast_shapes(jnp.shape(h), jnp.shape(q_idx),
                                 jnp.shape(kv_idx))
    dmin, dmax = span if span is not None else offset_range(q_idx, kv_idx)
    end = jnp.where(dmax <= -(w - 1), jnp.int32(0), jnp.int32(2 * w - 2))
    scaled = (lambda x: x) if factor is None else (lambda x: factor * x)
    return jax.lax.cond(
        (dmax <= -(w - 1)) | (dmin >= w - 1),
        lambda: jnp.broadcast_to(scaled(self.table[h, end]), shape),
        lambda: jnp.broadcast_to(
            scaled(self.table[h, self._bucket(q_idx, kv_idx)]), shape))

  @property
  def num_stats(self) -> int:
    return 2 * self.window - 1

  def tile_stats(self, g, score, b, h, q_idx, kv_idx, width):
    """Sum of g per clipped offset. A tile outside the band (every offset
    clipped to one end) is one reduction; a band tile loops over the
    offsets inside (-(W-1), W-1) that it holds (at most bq + bk - 1), each a
    masked reduction, plus one for each end bucket."""
    w = self.window
    lo, hi, last = -(w - 1), w - 1, 2 * w - 2
    d = kv_idx - q_idx
    dmin, dmax = offset_range(q_idx, kv_idx)

    def one_end():
      # int32 constants: a weakly typed where() breaks the Triton lowering.
      end = jnp.where(dmax <= lo, jnp.int32(0), jnp.int32(last))
      return bucket(width, end, jnp.sum(g))

    def band():
      acc = (bucket(width, 0, jnp.sum(jnp.where(d <= lo, g, 0.0))) +
             bucket(width, last, jnp.sum(jnp.where(d >= hi, g, 0.0))))

      def offset(t, a):
        return a + bucket(width, t + (w - 1),
                          jnp.sum(jnp.where(d == t, g, 0.0)))

      return jax.lax.fori_loop(jnp.maximum(dmin, lo + 1),
                               jnp.minimum(dmax, hi - 1) + 1, offset, acc)

    return jax.lax.cond((dmax <= lo) | (dmin >= hi), one_end, band)

  def stats_to_grads(self, stats):
    return (tree_sum(stats, 0),)

  def kernel_unsupported(self, impl):
    if impl == "pallas_tpu":
      return ("RelativeBias needs a vector gather (table[h, offsets]) that "
              "Mosaic TPU lacks")
    return None


__all__ = ["ScoreMod", "Alibi", "RelativeBias", "register", "bucket",
           "tree_sum"]
