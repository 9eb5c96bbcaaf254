"""A paged KV cache: fixed-size pages from one pool, a page table per sequence.

K and V live in a pool of `num_pages` pages of `page_size` tokens per kv head,
[Hkv, P, page, D] (so one kv head's page is one contiguous [page, D] tile).
Sequence b's token t is row t % page of physical page
page_table[b, t // page]. Free pages sit on a stack (`free`, `num_free`):
a sequence crossing a page boundary pops one, `release` pushes its pages
back, so sequences of any mix of lengths share the pool (ragged batches,
continuous batching). Entries of the page table past a sequence's pages are
stale and never read: decode visits ceil(lengths / page) pages.

Optional per-sequence metadata, stored by logical page / position (not
paged: it is small, and decode-time selection reads it without a gather):
  * Quest: per page, channel-wise min and max of the keys
    (`page_min`, `page_max` [B, Hkv, max_pages, D]);
  * Double Sparsity: the label cache, keys restricted to calibrated channels
    (`labels` [B, Hkv, max_len, r], `channels` int32 [Hkv, r]).

Overflow follows `S2KVCache`: eagerly, appending to a full sequence or with
no free page raises ValueError; under jit the write is dropped (scatter
mode="drop", never out of bounds), the length stays and the sticky
`overflowed` flag is set (`raise_if_overflowed()` reports it outside jit).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.inference.s2_cache import _concrete  # pylint: disable=protected-access


class VisitList(NamedTuple):
  """What one decode call reads: per (sequence, list head), a page list.

  Entry e < counts[b, l] of list head l is physical page pages[b, l, e]
  holding the tokens at positions logical[b, l, e] * page + [0, page); those
  with position < limits[b, l] are attended. The list head axis has 1 (shared
  by every head), Hkv (one list per kv head, its q heads as rows of one tile)
  or H (one list per q head) entries. Token lists are page lists over the
  pool's token view (`token_view`, page 1).
  """
  pages: jax.Array  # int32 [B, Hl, W]
  logical: jax.Array  # int32 [B, Hl, W]
  counts: jax.Array  # int32 [B, Hl]
  limits: jax.Array  # int32 [B, Hl]


def token_view(pool: jax.Array) -> jax.Array:
  """[Hkv, P, page, D] -> [Hkv, P * page, 1, D]: one token per page (free)."""
  h, p, page, d = pool.shape
  return pool.reshape(h, p * page, 1, d)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k_pages", "v_pages", "page_table", "lengths",
                                "free", "num_free", "overflowed", "page_min",
                                "page_max", "labels", "channels"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
  """Paged K/V (a pytree; all sizes come from the array shapes)."""
  k_pages: jax.Array  # [Hkv, P, page, D]
  v_pages: jax.Array
  page_table: jax.Array  # int32 [B, max_pages]
  lengths: jax.Array  # int32 [B]
  free: jax.Array  # int32 [P]: free page ids, the top is free[num_free - 1]
  num_free: jax.Array  # int32 []
  overflowed: jax.Array  # bool [B]
  page_min: Optional[jax.Array] = None  # [B, Hkv, max_pages, D] (Quest)
  page_max: Optional[jax.Array] = None
  labels: Optional[jax.Array] = None  # [B, Hkv, max_len, r] (Double Sp.)
  channels: Optional[jax.Array] = None  # int32 [Hkv, r]

  # --- construction ----------------------------------------------------------

  @classmethod
  def create(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype, *, page_size: int = 16, num_pages: Optional[int] = None,
             page_bounds: bool = False, channels=None,
             shuffle_key: Optional[jax.Array] = None) -> "PagedKVCache":
    """An empty cache for `batch` sequences of up to `max_len` tokens.

    Args:
      batch, max_len, num_kv_heads, head_dim, dtype: the cache's shape.
      page_size: tokens per page.
      num_pages: pool size; default batch * ceil(max_len / page_size), so
        every sequence can reach max_len.
      page_bounds: keep Quest's per-page key min/max.
      channels: int [Hkv, r] calibrated channels: keep a label cache.
      shuffle_key: a PRNG key to hand out pages in random order (pages of a
        sequence then scatter over the pool, as after a long serving run).
    """
    for name, val in (("batch", batch), ("max_len", max_len),
                      ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                      ("page_size", page_size)):
      if not isinstance(val, (int, np.integer)) or val < 1:
        raise ValueError(f"{name} must be a positive int, got {val!r}")
    max_pages = -(-max_len // page_size)
    num_pages = batch * max_pages if num_pages is None else num_pages
    if not isinstance(num_pages, (int, np.integer)) or num_pages < 1:
      raise ValueError(f"num_pages must be a positive int, got {num_pages!r}")
    pool = jnp.zeros((num_kv_heads, num_pages, page_size, head_dim), dtype)
    # Stack order: page 0 is popped first.
    free = jnp.arange(num_pages - 1, -1, -1, dtype=jnp.int32)
    if shuffle_key is not None:
      free = jax.random.permutation(shuffle_key, free)
    lo = hi = lab = ch = None
    if page_bounds:
      lo = jnp.zeros((batch, num_kv_heads, max_pages, head_dim), dtype)
      hi = lo
    if channels is not None:
      ch = jnp.asarray(channels, jnp.int32)
      if ch.ndim != 2 or ch.shape[0] != num_kv_heads:
        raise ValueError(f"channels must be int [num_kv_heads="
                         f"{num_kv_heads}, r], got shape {ch.shape}")
      chn = _concrete(ch)
      if chn is not None and ((chn < 0) | (chn >= head_dim)).any():
        raise ValueError(f"channels must lie in [0, head_dim={head_dim})")
      lab = jnp.zeros((batch, num_kv_heads, max_pages * page_size,
                       ch.shape[1]), dtype)
    return cls(pool, pool, jnp.zeros((batch, max_pages), jnp.int32),
               jnp.zeros((batch,), jnp.int32), free,
               jnp.asarray(num_pages, jnp.int32), jnp.zeros((batch,), bool),
               lo, hi, lab, ch)

  # --- sizes -------------------------------------------------------------------

  @property
  def page_size(self) -> int:
    return self.k_pages.shape[2]

  @property
  def max_pages(self) -> int:
    return self.page_table.shape[1]

  @property
  def max_len(self) -> int:
    return self.max_pages * self.page_size

  @property
  def num_kv_heads(self) -> int:
    return self.k_pages.shape[0]

  def kv_bytes(self) -> int:
    """Bytes of the K/V pool (works on jax.eval_shape results too)."""
    return 2 * int(np.prod(self.k_pages.shape)) * jnp.dtype(
        self.k_pages.dtype).itemsize

  # --- writes ------------------------------------------------------------------

  def prefill(self, k, v, lengths) -> "PagedKVCache":
    """Replaces the contents with prompts k, v [B, L, Hkv, D] (right-padded;
    sequence b has lengths[b] <= L valid tokens). All pages are freed first,
    then each sequence takes ceil(lengths[b] / page) pages."""
    b, hkv, d = self.lengths.shape[0], self.num_kv_heads, self.k_pages.shape[3]
    if k.shape != v.shape or k.ndim != 4 or (k.shape[0], k.shape[2],
                                             k.shape[3]) != (b, hkv, d):
      raise ValueError(f"k and v must be [batch={b}, L, kv_heads={hkv}, "
                       f"head_dim={d}], got {k.shape} and {v.shape}")
    if k.shape[1] > self.max_len:
      raise ValueError(f"prompt length {k.shape[1]} exceeds the cache's "
                       f"max_len {self.max_len}")
    lengths = jnp.asarray(lengths, jnp.int32)
    lens = _concrete(lengths)
    if lens is not None:
      if lens.shape != (b,) or (lens < 0).any() or (lens > k.shape[1]).any():
        raise ValueError(f"lengths must be [batch={b}] ints in [0, "
                         f"{k.shape[1]}], got {lens}")
      need = int((-(-lens // self.page_size)).sum())
      if need > self.k_pages.shape[1]:
        raise ValueError(f"the prompts need {need} pages, the pool has "
                         f"{self.k_pages.shape[1]}")
    dt = self.k_pages.dtype
    return _prefill(self, k.astype(dt), v.astype(dt), lengths)

  def append(self, k_new, v_new) -> "PagedKVCache":
    """Writes one token per sequence, k_new, v_new [B, Hkv, D], at position
    lengths[b]. Raises (eagerly) if a sequence is full or the pool is out
    of pages."""
    want = (self.lengths.shape[0], self.num_kv_heads, self.k_pages.shape[3])
    if k_new.shape != want or v_new.shape != want:
      raise ValueError(f"k_new and v_new must be {want}, got {k_new.shape} "
                       f"and {v_new.shape}")
    lens = _concrete(self.lengths)
    if lens is not None:
      full = np.flatnonzero(lens >= self.max_len)
      if full.size:
        raise ValueError(f"PagedKVCache is full: sequences {full.tolist()} "
                         f"already hold max_len={self.max_len} tokens")
      need = int((lens % self.page_size == 0).sum())
      if need > int(self.num_free):
        raise ValueError(f"PagedKVCache is out of pages: {need} sequences "
                         f"need a new page, {int(self.num_free)} are free")
    dt = self.k_pages.dtype
    return _append(self, k_new.astype(dt), v_new.astype(dt))

  def release(self, which) -> "PagedKVCache":
    """Frees the pages of the sequences where `which` (bool [B]) is True and
    empties them (length 0), e.g. when a request finishes."""
    which = jnp.asarray(which, bool)
    if which.shape != self.lengths.shape:
      raise ValueError(f"which must be bool [batch={self.lengths.shape[0]}],"
                       f" got shape {which.shape}")
    return _release(self, which)

  def raise_if_overflowed(self) -> None:
    """Eager check for writes dropped under jit (see the module doc)."""
    over = np.asarray(self.overflowed)
    if over.any():
      raise ValueError(f"writes past max_len={self.max_len} or past the "
                       f"pool's pages were dropped for sequences "
                       f"{np.flatnonzero(over).tolist()}")

  # --- what decode reads -------------------------------------------------------

  def dense_lists(self) -> VisitList:
    """Every cached page of each sequence, shared by all heads."""
    b, w = self.page_table.shape
    counts = -(-self.lengths // self.page_size)
    logical = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, 1, w))
    return VisitList(self.page_table[:, None], logical, counts[:, None],
                     self.lengths[:, None])

  def page_lists(self, logical, counts) -> VisitList:
    """Lists of selected logical pages [B, Hl, K] (valid entries first)."""
    pages = jnp.take_along_axis(self.page_table[:, None], logical, axis=2)
    limits = jnp.broadcast_to(self.lengths[:, None], counts.shape)
    return VisitList(pages, logical, counts, limits)

  def token_lists(self, positions, counts) -> VisitList:
    """Lists of selected token positions [B, Hl, K] for the token view."""
    page = self.page_size
    phys = jnp.take_along_axis(self.page_table[:, None], positions // page,
                               axis=2)
    limits = jnp.broadcast_to(self.lengths[:, None], counts.shape)
    return VisitList(phys * page + positions % page, positions, counts,
                     limits)

  def dense_kv(self):
    """K, V as [B, max_len, Hkv, D] in logical order (for references)."""
    def gather(pool):
      x = pool[:, self.page_table]  # [Hkv, B, W, page, D]
      return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1]).transpose(
          1, 2, 0, 3)
    return gather(self.k_pages), gather(self.v_pages)


# --- implementations (jitted) ------------------------------------------------


def _scatter_tokens(pool, x, table, lengths):
  """pool [Hkv, P, page, D] <- x [B, L, Hkv, D] at each sequence's pages."""
  b, l, hkv, d = x.shape
  page, npool = pool.shape[2], pool.shape[1]
  nbl = -(-l // page)
  keep = jnp.arange(nbl * page)[None, :] < lengths[:, None]
  x = jnp.pad(x, ((0, 0), (0, nbl * page - l), (0, 0), (0, 0)))
  x = jnp.where(keep[..., None, None], x, 0)
  x = x.reshape(b, nbl, page, hkv, d).transpose(3, 0, 1, 2, 4)
  used = jnp.arange(nbl)[None] < -(-lengths // page)[:, None]
  dest = jnp.where(used, table[:, :nbl], npool)  # unused: dropped
  return pool.at[:, dest].set(x, mode="drop")


def _page_bounds(k, lengths, max_pages, page):
  """Channel-wise min/max of the valid keys of every page: [B, Hkv, W, D]."""
  b, l, hkv, d = k.shape
  n = max_pages * page
  kf = jnp.pad(k, ((0, 0), (0, n - l), (0, 0), (0, 0)))
  valid = (jnp.arange(n)[None] < lengths[:, None])[..., None, None]
  kf = kf.reshape(b, max_pages, page, hkv, d)
  valid = valid.reshape(b, max_pages, page, 1, 1)
  big = jnp.asarray(jnp.inf, k.dtype)
  lo = jnp.where(valid, kf, big).min(2).transpose(0, 2, 1, 3)
  hi = jnp.where(valid, kf, -big).max(2).transpose(0, 2, 1, 3)
  empty = ~valid.any(2).transpose(0, 2, 1, 3)
  return jnp.where(empty, 0, lo), jnp.where(empty, 0, hi)


def _labels_of(k, channels):
  """k [..., Hkv, D] -> [..., Hkv, r]: each kv head's calibrated channels."""
  idx = jnp.broadcast_to(channels, k.shape[:-2] + channels.shape)
  return jnp.take_along_axis(k, idx, axis=-1)


@jax.jit
def _prefill(cache: PagedKVCache, k, v, lengths) -> PagedKVCache:
  b, l = k.shape[:2]
  page, npool = cache.page_size, cache.k_pages.shape[1]
  counts = -(-lengths // page)
  start = jnp.cumsum(counts) - counts  # first stack offset of each sequence
  fits = start + counts <= npool
  counts = jnp.where(fits, counts, 0)
  lengths = jnp.where(fits, lengths, 0)
  # Every page is free again; pages are popped from the top of the stack.
  order = _full_stack(cache)
  j = jnp.arange(cache.max_pages)[None]
  pos = jnp.clip(npool - 1 - (start[:, None] + j), 0, npool - 1)
  table = jnp.where(j < counts[:, None], order[pos], 0).astype(jnp.int32)
  out = dataclasses.replace(
      cache, k_pages=_scatter_tokens(cache.k_pages, k, table, lengths),
      v_pages=_scatter_tokens(cache.v_pages, v, table, lengths),
      page_table=table, lengths=lengths, free=order,
      num_free=(npool - counts.sum()).astype(jnp.int32), overflowed=~fits)
  if cache.page_min is not None:
    lo, hi = _page_bounds(k, lengths, cache.max_pages, page)
    out = dataclasses.replace(out, page_min=lo, page_max=hi)
  if cache.labels is not None:
    lab = _labels_of(k, cache.channels).transpose(0, 2, 1, 3)
    keep = jnp.arange(l)[None, None, :, None] < lengths[:, None, None, None]
    lab = jnp.where(keep, lab, 0)
    out = dataclasses.replace(out, labels=jnp.zeros_like(cache.labels).at[
        :, :, :l].set(lab))
  return out


def _full_stack(cache: PagedKVCache):
  """The free stack with every page free, in the cache's hand-out order:
  live pages are pushed back on top in page-table order (prefill frees all)."""
  b, w = cache.page_table.shape
  npool = cache.free.shape[0]
  live = jnp.arange(w)[None] < -(-cache.lengths // cache.page_size)[:, None]
  # Stack = [free pages (bottom..top)] + live pages; recover an order in
  # which every page appears once: stable by (is-free-slot, position).
  pushed = jnp.where(live, cache.page_table, npool).reshape(-1)
  stack = jnp.concatenate([cache.free, pushed])
  valid = jnp.concatenate([jnp.arange(npool) < cache.num_free,
                           pushed < npool])
  order = jnp.argsort(~valid, stable=True)[:npool]
  return stack[order]


@jax.jit
def _append(cache: PagedKVCache, k_new, v_new) -> PagedKVCache:
  page, npool = cache.page_size, cache.k_pages.shape[1]
  pos = cache.lengths
  full = pos >= cache.max_len
  need = (pos % page == 0) & ~full
  rank = jnp.cumsum(need) - 1
  got = need & (rank < cache.num_free)
  new_id = cache.free[jnp.clip(cache.num_free - 1 - rank, 0, npool - 1)]
  over = full | (need & ~got)
  slot = jnp.minimum(pos // page, cache.max_pages - 1)
  bi = jnp.arange(pos.shape[0])
  table = jnp.where(got[:, None] & (jnp.arange(cache.max_pages)[None] ==
                                    slot[:, None]),
                    new_id[:, None], cache.page_table)
  phys = jnp.where(over, npool, table[bi, slot])  # npool: dropped
  row = pos % page

  def put(pool, x):  # x [B, Hkv, D] -> pool[:, phys, row]
    return pool.at[:, phys, row].set(x.transpose(1, 0, 2), mode="drop")

  out = dataclasses.replace(
      cache, k_pages=put(cache.k_pages, k_new),
      v_pages=put(cache.v_pages, v_new), page_table=table,
      lengths=jnp.where(over, pos, pos + 1),
      num_free=(cache.num_free - got.sum()).astype(jnp.int32),
      overflowed=cache.overflowed | over)
  drop_b = jnp.where(over, pos.shape[0], bi)  # out-of-range batch: dropped
  if cache.page_min is not None:
    first = (row == 0)[:, None, None]
    lo = cache.page_min[bi, :, slot]  # [B, Hkv, D]
    hi = cache.page_max[bi, :, slot]
    lo = jnp.where(first, k_new, jnp.minimum(lo, k_new))
    hi = jnp.where(first, k_new, jnp.maximum(hi, k_new))
    out = dataclasses.replace(
        out, page_min=cache.page_min.at[drop_b, :, slot].set(lo, mode="drop"),
        page_max=cache.page_max.at[drop_b, :, slot].set(hi, mode="drop"))
  if cache.labels is not None:
    lab = _labels_of(k_new, cache.channels)  # [B, Hkv, r]
    out = dataclasses.replace(out, labels=cache.labels.at[
        drop_b, :, jnp.minimum(pos, cache.max_len - 1)].set(lab, mode="drop"))
  return out


@jax.jit
def _release(cache: PagedKVCache, which) -> PagedKVCache:
  npool, w = cache.free.shape[0], cache.max_pages
  owned = (jnp.arange(w)[None] < -(-cache.lengths // cache.page_size)[:, None]
           ) & which[:, None]
  ids = jnp.where(owned, cache.page_table, npool).reshape(-1)
  ids = ids[jnp.argsort(ids == npool, stable=True)]  # owned pages first
  n = owned.sum()
  dest = jnp.where(jnp.arange(ids.shape[0]) < n,
                   cache.num_free + jnp.arange(ids.shape[0]), npool)
  return dataclasses.replace(
      cache, free=cache.free.at[dest].set(ids, mode="drop"),
      num_free=(cache.num_free + n).astype(jnp.int32),
      lengths=jnp.where(which, 0, cache.lengths),
      page_table=jnp.where(which[:, None], 0, cache.page_table),
      overflowed=cache.overflowed & ~which)
