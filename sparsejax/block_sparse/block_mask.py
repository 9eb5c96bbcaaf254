"""`BlockMask`: block-sparse attention structure as data.

For each (batch|1, head|1, q_block) the mask lists the kv blocks that are *full*
(every element visible: no element work) and *partial* (the element mask
`mask_fn` must be applied), as sorted index lists with counts. The transposed
lists (per kv block: which q blocks) drive the dK/dV backward pass.

Everything here is jnp code, so masks can be built under `jit` from traced
data (e.g. top-k block selection). List widths are the true maximum count when
the block states are concrete, and the number of blocks when traced.
`BlockMask.from_lists` skips the block states: it takes the lists themselves
(e.g. sorted top-k indices, `sorted_lists`) and sorts them into the
transposed lists (`transpose_lists`), so no [nq, nk] array is needed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2

# mask_fn(b, h, q_idx, kv_idx) -> bool array; arguments broadcast against each
# other. It must be pure index arithmetic (jnp ops), since kernels evaluate it
# in registers.
MaskFn = Callable[[Any, Any, Any, Any], Any]


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def compress(member, width: Optional[int] = None):
  """Sorted indices of the True entries along the last axis, and their count.

  Returns (counts int32 [...], idx int32 [..., width]); entries past a row's
  count repeat its last valid index (0 for empty rows), so a pipeline that
  prefetches the next index never touches a new block. Concrete inputs take
  an O(nnz) numpy path; traced ones a jnp scatter.
  """
  if _is_concrete(member):
    return _compress_np(np.asarray(member), width)
  return compress_traced(member, width)


def compress_traced(member, width: Optional[int] = None):
  """`compress` on device (jnp scatter) with a static width, concrete input
  or not: same shapes for any data, so no recompilation."""
  member = jnp.asarray(member)
  n = member.shape[-1]
  counts = member.sum(-1, dtype=jnp.int32)
  width = max(1, min(width or n, n))
  pos = jnp.cumsum(member, axis=-1, dtype=jnp.int32) - 1
  slot = jnp.where(member, pos, width)  # width is out of range: dropped
  cols = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), member.shape)
  flat_slot = slot.reshape(-1, n)
  rows = jnp.arange(flat_slot.shape[0])[:, None]
  idx = jnp.zeros((flat_slot.shape[0], width), jnp.int32)
  idx = idx.at[rows, flat_slot].set(cols.reshape(-1, n), mode="drop")
  idx = idx.reshape(*member.shape[:-1], width)
  last = jnp.take_along_axis(idx, jnp.maximum(counts - 1, 0)[..., None], -1)
  idx = jnp.where(jnp.arange(width) < counts[..., None], idx, last)
  return counts, idx


def _compress_np(member: np.ndarray, width: Optional[int]):
  n = member.shape[-1]
  flat = member.reshape(-1, n)
  counts = flat.sum(-1).astype(np.int32)
  width = max(1, min(width or int(counts.max(initial=0)), n))
  rows, cols = np.nonzero(flat)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  pos = np.arange(rows.size) - starts[rows]
  keep = pos < width
  idx = np.zeros((flat.shape[0], width), np.int32)
  idx[rows[keep], pos[keep]] = cols[keep]
  last = idx[np.arange(flat.shape[0]), np.maximum(counts - 1, 0)]
  idx = np.where(np.arange(width) < counts[:, None], idx, last[:, None])
  shape = member.shape[:-1]
  return (jnp.asarray(counts.reshape(shape)),
          jnp.asarray(idx.reshape(*shape, width).astype(np.int32)))


_NONE = np.iinfo(np.int32).max  # sorts after every index


def _pad_rows(key, counts, width):
  """Sorted keys [..., C] (valid first) -> compress's format at `width`."""
  c = key.shape[-1]
  if width > c:
    pad = [(0, 0)] * (key.ndim - 1) + [(0, width - c)]
    key = jnp.pad(key, pad, constant_values=_NONE)
  key = key[..., :width]
  counts = jnp.minimum(counts, width)
  last = jnp.take_along_axis(key, jnp.maximum(counts - 1, 0)[..., None], -1)
  last = jnp.where(counts[..., None] > 0, last, 0)
  return counts, jnp.where(jnp.arange(width) < counts[..., None], key, last)


def sorted_lists(cand, valid, width: Optional[int] = None, *,
                 unique: bool = False):
  """`compress`'s lists from candidate indices, without a [..., n] pass.

  cand int [..., C]: candidate block indices of each row, in any order;
  valid bool (broadcast to cand): which of them count. Returns (counts
  [...], idx [..., width]): each row's valid candidates sorted, duplicates
  dropped (pass unique=True when there are none: one sort instead of two),
  padded as `compress` pads. width defaults to C; a row with more than
  `width` entries keeps its first `width`. Works traced (static shapes);
  the cost is a sort over C per row, so k-of-n selections cost O(k log k)
  per row rather than O(n).
  """
  cand = jnp.asarray(cand)
  if not jnp.issubdtype(cand.dtype, jnp.integer):
    raise TypeError(f"cand must be an integer array, got {cand.dtype}")
  valid = jnp.broadcast_to(jnp.asarray(valid, bool), cand.shape)
  key = jnp.sort(jnp.where(valid, cand.astype(jnp.int32), _NONE), axis=-1)
  if not unique:
    dup = jnp.concatenate([jnp.zeros_like(key[..., :1], bool),
                           key[..., 1:] == key[..., :-1]], -1)
    key = jnp.sort(jnp.where(dup, _NONE, key), axis=-1)
  counts = (key != _NONE).sum(-1, dtype=jnp.int32)
  width = cand.shape[-1] if width is None else int(width)
  if width < 1:
    raise ValueError(f"width must be >= 1, got {width}")
  return _pad_rows(key, counts, width)


def transpose_lists(counts, idx, num_cols: int, width: Optional[int] = None):
  """The transposed lists of (counts [..., R], idx [..., R, W]): for each
  of `num_cols` columns, the sorted rows listing it (`compress`'s format).

  One sort of the R * W (column, row) keys per leading index, then a
  binary search for each column's start and a gather: no [..., R, num_cols]
  array. width defaults to R (any traced list fits); a column listed by
  more rows keeps its first `width`.
  """
  counts, idx = jnp.asarray(counts), jnp.asarray(idx)
  *lead, r, w = idx.shape
  if tuple(counts.shape) != tuple(lead) + (r,):
    raise ValueError(f"counts {counts.shape} must be idx's shape {idx.shape}"
                     f" without the last axis")
  listed = jnp.arange(w) < counts[..., None]
  rows = jnp.arange(r, dtype=jnp.int32)[:, None]
  key = jnp.where(listed, idx.astype(jnp.int32) * r + rows, num_cols * r)
  key = jnp.sort(key.reshape(-1, r * w), axis=-1)
  bounds = jnp.arange(num_cols + 1, dtype=jnp.int32) * r
  starts = jax.vmap(lambda row: jnp.searchsorted(row, bounds))(key)
  starts = starts.astype(jnp.int32)
  counts_t = starts[:, 1:] - starts[:, :-1]
  width = r if width is None else int(width)
  if width < 1:
    raise ValueError(f"width must be >= 1, got {width}")
  counts_t = jnp.minimum(counts_t, width)
  step = jnp.minimum(jnp.arange(width), jnp.maximum(counts_t - 1, 0)[..., None])
  pos = jnp.minimum(starts[:, :-1, None] + step, r * w - 1)
  rows_t = jnp.take_along_axis(key, pos.reshape(key.shape[0], -1), -1) % r
  rows_t = jnp.where(counts_t[..., None] > 0,
                     rows_t.reshape(-1, num_cols, width), 0)
  return (counts_t.reshape(*lead, num_cols),
          rows_t.reshape(*lead, num_cols, width).astype(jnp.int32))


def _fit_lists(name, counts, idx, lead, rows, width):
  """Validated (counts, idx) broadcast to `lead`, padded to `width`."""
  counts, idx = jnp.asarray(counts), jnp.asarray(idx)
  if counts.ndim != 3 or idx.ndim != 4 or idx.shape[:3] != counts.shape:
    raise ValueError(f"{name} must be counts [B|1, H|1, n] and idx "
                     f"[B|1, H|1, n, width], got {counts.shape} and "
                     f"{idx.shape}")
  if counts.shape[2] != rows:
    raise ValueError(f"{name} must have {rows} rows, got {counts.shape[2]}")
  for x in (counts, idx):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f"{name} must be integer arrays, got {x.dtype}")
  counts = jnp.broadcast_to(counts.astype(jnp.int32), lead + (rows,))
  idx = jnp.broadcast_to(idx.astype(jnp.int32), lead + idx.shape[2:])
  listed = jnp.arange(idx.shape[-1]) < counts[..., None]
  key = jnp.where(listed, idx, _NONE)
  return _pad_rows(key, counts, max(width or 1, idx.shape[-1]))


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class BlockMask:
  """Block-sparse attention mask: kv-block lists per (batch, head, q block).

  Array fields (int32; leading dims are batch|1 and heads|1, broadcast where 1):
    full_counts [B,H,nq], full_idx [B,H,nq,Wf]: kv blocks with no masking.
    partial_counts [B,H,nq], partial_idx [B,H,nq,Wp]: kv blocks needing mask_fn.
    full_counts_t [B,H,nk], full_idx_t [B,H,nk,Wft]: transposed (q blocks).
    partial_counts_t [B,H,nk], partial_idx_t [B,H,nk,Wpt].
  Static fields: block_q, block_kv, q_len, kv_len, mask_fn, mask_fn_exact.
  `mask_fn_exact` says mask_fn alone defines the mask (it is False outside
  the listed blocks), which `|` needs.
  """

  full_counts: jax.Array
  full_idx: jax.Array
  partial_counts: jax.Array
  partial_idx: jax.Array
  full_counts_t: jax.Array
  full_idx_t: jax.Array
  partial_counts_t: jax.Array
  partial_idx_t: jax.Array
  block_q: int
  block_kv: int
  q_len: int
  kv_len: int
  mask_fn: Optional[MaskFn] = None
  mask_fn_exact: bool = True
  # A cheaper function equal to mask_fn on this mask's partial blocks (e.g.
  # plain causal on S2's diagonal blocks); kernels use it when set.
  partial_fn: Optional[MaskFn] = None

  _ARRAYS = ("full_counts", "full_idx", "partial_counts", "partial_idx",
             "full_counts_t", "full_idx_t", "partial_counts_t",
             "partial_idx_t")
  _STATIC = ("block_q", "block_kv", "q_len", "kv_len", "mask_fn",
             "mask_fn_exact", "partial_fn")

  def tree_flatten(self):
    return (tuple(getattr(self, f) for f in self._ARRAYS),
            tuple(getattr(self, f) for f in self._STATIC))

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  # --- construction -------------------------------------------------------

  @classmethod
  def from_states(cls, states: jax.Array, *, block_q: int, block_kv: int,
                  q_len: int, kv_len: int, mask_fn: Optional[MaskFn] = None,
                  mask_fn_exact: bool = True,
                  partial_fn: Optional[MaskFn] = None) -> "BlockMask":
    """Builds the lists from block states (EMPTY/PARTIAL/FULL) [B|1,H|1,nq,nk]."""
    states = jnp.asarray(states)
    if states.ndim != 4:
      raise ValueError(f"states must be [B|1, H|1, nq, nk], got {states.shape}")
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    if states.shape[2:] != (nq, nk):
      raise ValueError(f"states must have (nq, nk) = {(nq, nk)} for q_len="
                       f"{q_len}, kv_len={kv_len}, blocks ({block_q}, "
                       f"{block_kv}); got {states.shape[2:]}")
    if mask_fn is None:  # nothing to apply on partial blocks: they are full
      states = jnp.where(states == PARTIAL, FULL, states)
    full, part = states == FULL, states == PARTIAL
    fc, fi = compress(full)
    pc, pi = compress(part)
    fct, fit = compress(jnp.swapaxes(full, -1, -2))
    pct, pit = compress(jnp.swapaxes(part, -1, -2))
    return cls(fc, fi, pc, pi, fct, fit, pct, pit, block_q, block_kv, q_len,
               kv_len, mask_fn, mask_fn_exact,
               partial_fn if mask_fn is not None else None)

  @classmethod
  def from_lists(cls, full_counts, full_idx, partial_counts=None,
                 partial_idx=None, *, block_q: int, block_kv: int,
                 q_len: int, kv_len: int, mask_fn: Optional[MaskFn] = None,
                 mask_fn_exact: bool = False,
                 partial_fn: Optional[MaskFn] = None, full_t=None,
                 partial_t=None, width: Optional[int] = None,
                 width_t: Optional[int] = None) -> "BlockMask":
    """A BlockMask from its per-q-block lists (traced or concrete).

    For data-dependent masks whose kept blocks are known as indices (top-k,
    gathered columns): no [nq, nk] block states and no mask_fn evaluation.
    The lists (counts [B|1, H|1, nq], idx [..., nq, W]) must be sorted,
    without duplicates, within [0, nk), and full and partial disjoint;
    entries past a row's count are ignored. Partial blocks need a mask_fn
    (the element mask kernels apply on them); `mask_fn_exact` says whether
    it alone defines the mask, as in the constructor. The transposed lists
    are `transpose_lists` of the lists unless given as full_t / partial_t
    ((counts [.., nk], idx [.., nk, Wt]) pairs). width / width_t pad every
    list to at least that width (equal shapes share a compiled kernel).
    """
    for name, b in (("block_q", block_q), ("block_kv", block_kv),
                    ("q_len", q_len), ("kv_len", kv_len)):
      if not isinstance(b, (int, np.integer)) or b < 1:
        raise ValueError(f"{name} must be a positive int, got {b!r}")
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    if partial_idx is None:
      if partial_counts is not None:
        raise ValueError("pass partial_counts and partial_idx together")
      partial_counts = jnp.zeros((1, 1, nq), jnp.int32)
      partial_idx = jnp.zeros((1, 1, nq, 1), jnp.int32)
    elif mask_fn is None:
      raise ValueError("partial lists need a mask_fn (the element mask of "
                       "partial blocks)")
    shapes = [jnp.shape(x) for x in (full_counts, partial_counts)]
    if any(len(s) != 3 for s in shapes):
      raise ValueError(f"counts must be [B|1, H|1, nq], got {shapes}")
    lead = tuple(int(max(a, b)) for a, b in zip(shapes[0][:2],
                                                 shapes[1][:2]))
    fc, fi = _fit_lists("full lists", full_counts, full_idx, lead, nq, width)
    pc, pi = _fit_lists("partial lists", partial_counts, partial_idx, lead,
                        nq, width)
    transposed = []
    for name, given, (c, i) in (("full_t", full_t, (fc, fi)),
                                ("partial_t", partial_t, (pc, pi))):
      if given is None:
        given = transpose_lists(c, i, nk, width_t)
      transposed.append(_fit_lists(name, *given, lead, nk, width_t))
    (fct, fit), (pct, pit) = transposed
    return cls(fc, fi, pc, pi, fct, fit, pct, pit, int(block_q),
               int(block_kv), int(q_len), int(kv_len), mask_fn,
               mask_fn_exact, partial_fn if mask_fn is not None else None)

  # --- inspection ---------------------------------------------------------

  @property
  def kernel_mask_fn(self) -> Optional[MaskFn]:
    """The element mask kernels apply on partial blocks."""
    return self.partial_fn if self.partial_fn is not None else self.mask_fn

  @property
  def num_q_blocks(self) -> int:
    return self.full_counts.shape[-1]

  @property
  def num_kv_blocks(self) -> int:
    return self.full_counts_t.shape[-1]

  @property
  def batch_size(self) -> int:
    return self.full_counts.shape[0]

  @property
  def num_heads(self) -> int:
    return self.full_counts.shape[1]

  def block_states(self) -> jax.Array:
    """int8 [B|1, H|1, nq, nk] of EMPTY / PARTIAL / FULL."""
    nk = self.num_kv_blocks
    out = jnp.zeros(self.full_counts.shape + (nk,), jnp.int8)
    for counts, idx, value in ((self.full_counts, self.full_idx, FULL),
                               (self.partial_counts, self.partial_idx,
                                PARTIAL)):
      b, h, nq, w = idx.shape
      cols = jnp.where(jnp.arange(w) < counts[..., None], idx, nk)  # nk: drop
      out = out.at[jnp.arange(b)[:, None, None, None],
                   jnp.arange(h)[None, :, None, None],
                   jnp.arange(nq)[None, None, :, None], cols].set(
                       jnp.int8(value), mode="drop")
    return out

  def density(self) -> jax.Array:
    """Fraction of (q block, kv block) pairs listed, per [B|1, H|1]."""
    n = self.num_q_blocks * self.num_kv_blocks
    return (self.full_counts.sum(-1) + self.partial_counts.sum(-1)) / n

  def to_dense(self) -> jax.Array:
    """bool [B|1, H|1, q_len, kv_len]. For tests and small references."""
    states = self.block_states()
    b, h = states.shape[:2]
    qb = jnp.arange(self.q_len) // self.block_q
    kb = jnp.arange(self.kv_len) // self.block_kv
    st = states[:, :, qb][:, :, :, kb]
    dense = st == FULL
    if self.mask_fn is not None:
      elem = self.mask_fn(jnp.arange(b)[:, None, None, None],
                          jnp.arange(h)[None, :, None, None],
                          jnp.arange(self.q_len)[None, None, :, None],
                          jnp.arange(self.kv_len)[None, None, None, :])
      dense = dense | ((st == PARTIAL) & elem)
    return dense

  def check_compatible(self, *, batch: int, heads: int, q_len: int,
                       kv_len: int) -> None:
    """Raises ValueError unless this mask fits attention of these shapes."""
    if (self.q_len, self.kv_len) != (q_len, kv_len):
      raise ValueError(
          f"mask was built for (q_len, kv_len) = ({self.q_len}, "
          f"{self.kv_len}) but q/k have ({q_len}, {kv_len})")
    if self.batch_size not in (1, batch):
      raise ValueError(
          f"mask was built for batch {self.batch_size} but q has batch "
          f"{batch}: a mask's batch dimension must be 1 (one mask shared by "
          f"every example) or {batch} (one mask per example)")
    if self.num_heads not in (1, heads):
      raise ValueError(
          f"mask was built for {self.num_heads} heads but q has {heads}: a "
          f"mask's head dimension must be 1 (shared by every head) or "
          f"{heads} (one per query head)")

  # --- composition --------------------------------------------------------

  def _combine(self, other: "BlockMask", op: str) -> "BlockMask":
    if not isinstance(other, BlockMask):
      return NotImplemented
    geometry = (self.block_q, self.block_kv, self.q_len, self.kv_len)
    other_geometry = (other.block_q, other.block_kv, other.q_len, other.kv_len)
    if geometry != other_geometry:
      raise ValueError(f"cannot combine masks of different geometry (block_q, "
                       f"block_kv, q_len, kv_len): {geometry} vs "
                       f"{other_geometry}")
    a, b = self.block_states(), other.block_states()
    from sparsejax.block_sparse import mask_fns  # pylint: disable=g-import-not-at-top
    if op == "and":
      states = jnp.where((a == EMPTY) | (b == EMPTY), EMPTY,
                         jnp.where((a == FULL) & (b == FULL), FULL, PARTIAL))
      fn = mask_fns.logical_and(self.mask_fn, other.mask_fn)
      exact = self.mask_fn_exact and other.mask_fn_exact
    else:
      # A combined partial block is partial in one operand and empty or
      # partial in the other, so the element mask is the OR of the operands'
      # exact element masks; a mask_fn=None operand only lists full blocks.
      for m in (self, other):
        if m.mask_fn is not None and not m.mask_fn_exact:
          raise ValueError(
              "`|` needs masks whose mask_fn defines the mask exactly; "
              "from_block_mask(..., mask_fn=...) masks are not: combine their "
              "block arrays first")
      states = jnp.where((a == FULL) | (b == FULL), FULL,
                         jnp.where((a == EMPTY) & (b == EMPTY), EMPTY,
                                   PARTIAL))
      fn = mask_fns.logical_or(self.mask_fn, other.mask_fn)
      exact = True
    return BlockMask.from_states(states, block_q=self.block_q,
                                 block_kv=self.block_kv, q_len=self.q_len,
                                 kv_len=self.kv_len, mask_fn=fn,
                                 mask_fn_exact=exact)

  def __and__(self, other):
    return self._combine(other, "and")

  def __or__(self, other):
    return self._combine(other, "or")

  def __repr__(self):
    return (f"BlockMask(batch={self.batch_size}, heads={self.num_heads}, "
            f"q_len={self.q_len}, kv_len={self.kv_len}, block=({self.block_q},"
            f" {self.block_kv}), widths=(full {self.full_idx.shape[-1]}, "
            f"partial {self.partial_idx.shape[-1]}), mask_fn={self.mask_fn})")


def broadcast_lists(mask: BlockMask, batch: int, heads: int) -> dict:
  """The mask's arrays broadcast to [batch, heads, ...] (for vmapped code)."""
  return {f: jnp.broadcast_to(getattr(mask, f),
                              (batch, heads) + getattr(mask, f).shape[2:])
          for f in BlockMask._ARRAYS}


def next_power_of_2(x: int) -> int:
  return 1 << max(0, int(x - 1).bit_length())
