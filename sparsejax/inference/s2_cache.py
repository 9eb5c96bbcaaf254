"""A per-kv-head compacted KV cache for S2-Attention decoding.

S2's absolute vertical pattern is KV-cache-efficient: once a query block stops
attending a kv block, no later one does. So sparse kv head g keeps
  * a ring of R = min(local_blocks, nblocks) block slots: block j lives in
    ring slot j % R while it is in the local window (the current, partly
    filled block included); leaving the window recycles its slot;
  * strided slots: block j with (j + g*step + offset) % vert_stride == 0 lives
    in slot R + j // vert_stride forever. Strided blocks are written to both
    places as tokens arrive, so no copy is needed when they leave the window;
    only blocks that can leave the window before max_len get a strided slot:
    ns = ceil((nblocks - local_blocks) / vert_stride).
Dense kv heads (the last num_dense_heads) keep every position in a separate
dense array [B, Hd, nblocks*block_size, D]: simpler than giving them sparse
slots of full capacity, and the decode kernel reads both through one "slot
list" interface (`SlotView`).

Positions are absolute; `lengths[b]` tokens are cached for sequence b. Decode
attends with the query at position lengths[b] - 1 (append its K/V first).

Overflow: `append` past max_len raises ValueError when called eagerly (the
lengths are concrete; one tiny device-to-host copy per step). Under a user's
jit the lengths are traced and cannot raise: writes past max_len are then
dropped (scatter mode="drop", never out of bounds), the length stops growing
and the sticky `overflowed` flag is set; `raise_if_overflowed()` turns it into
an error outside jit. (checkify would need every caller to wrap its step in
checkify.checkify; an eager check plus a flag needs nothing.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.inference.pattern import S2Pattern


class SlotView(NamedTuple):
  """What decode reads for one group of kv heads (G of them).

  k, v: [B, G, slots * block_size, D]. Entry e < counts[b, g] of the visit
  list is slot slot_idx[b, g, e], holding absolute kv block block_idx[b, g, e].
  Entries past the count are padding (valid indices, never visited).
  """
  k: jax.Array
  v: jax.Array
  slot_idx: jax.Array  # int32 [B, G, W]
  block_idx: jax.Array  # int32 [B, G, W]
  counts: jax.Array  # int32 [B, G]


def _concrete(x):
  """x as numpy if it is concrete (eager), else None (traced under jit)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return None


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["sparse_k", "sparse_v", "dense_k", "dense_v",
                                "lengths", "overflowed"],
                   meta_fields=["pattern", "max_len"])
@dataclasses.dataclass(frozen=True)
class S2KVCache:
  """Compacted S2 KV cache (a pytree; pattern and max_len are static)."""
  sparse_k: jax.Array  # [B, Hs, (R + ns) * bs, D]: ring slots, then strided
  sparse_v: jax.Array
  dense_k: jax.Array  # [B, Hd, nblocks * bs, D]
  dense_v: jax.Array
  lengths: jax.Array  # int32 [B]: tokens cached per sequence
  overflowed: jax.Array  # bool [B]: an append past max_len was dropped
  pattern: S2Pattern
  max_len: int

  # --- construction and capacity --------------------------------------------

  @classmethod
  def create(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
             dtype, pattern: S2Pattern) -> "S2KVCache":
    """An empty cache for `batch` sequences of up to `max_len` tokens."""
    if num_kv_heads != pattern.num_kv_heads:
      raise ValueError(f"num_kv_heads ({num_kv_heads}) must equal "
                       f"pattern.num_kv_heads ({pattern.num_kv_heads})")
    if max_len < 1 or batch < 1:
      raise ValueError(f"batch and max_len must be >= 1, got {batch}, "
                       f"{max_len}")
    bs = pattern.block_size
    nblocks = -(-max_len // bs)
    nslots = ring_slots(pattern, max_len) + strided_slots(pattern, max_len)
    hs, hd = pattern.num_sparse_heads, pattern.num_dense_heads
    sparse = jnp.zeros((batch, hs, nslots * bs, head_dim), dtype)
    dense = jnp.zeros((batch, hd, nblocks * bs, head_dim), dtype)
    return cls(sparse, sparse, dense, dense, jnp.zeros((batch,), jnp.int32),
               jnp.zeros((batch,), bool), pattern, int(max_len))

  @property
  def ring(self) -> int:
    return ring_slots(self.pattern, self.max_len)

  @property
  def strided(self) -> int:
    return strided_slots(self.pattern, self.max_len)

  def kv_bytes(self) -> int:
    """Bytes of K and V held (works on jax.eval_shape results too)."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in (self.sparse_k, self.sparse_v, self.dense_k,
                         self.dense_v))

  # --- writes ----------------------------------------------------------------

  def prefill(self, k, v, lengths) -> "S2KVCache":
    """Replaces the contents with prompts k, v [B, L, Hkv, D] (right-padded;
    sequence b has lengths[b] <= L valid tokens)."""
    b, l, hkv, d = self.sparse_k.shape[0], k.shape[1], k.shape[2], k.shape[3]
    if k.shape != v.shape or k.shape != (b, l, self.pattern.num_kv_heads, d):
      raise ValueError(f"k and v must be [batch={b}, L, kv_heads="
                       f"{self.pattern.num_kv_heads}, head_dim], got "
                       f"{k.shape} and {v.shape}")
    if l > self.max_len:
      raise ValueError(f"prompt length {l} exceeds the cache's max_len "
                       f"{self.max_len}")
    del hkv
    lengths = jnp.asarray(lengths, jnp.int32)
    lens = _concrete(lengths)
    if lens is not None and (lens.shape != (b,) or (lens < 0).any() or
                             (lens > l).any()):
      raise ValueError(f"lengths must be [batch={b}] ints in [0, {l}], got "
                       f"{lens}")
    return _prefill(self, k.astype(self.sparse_k.dtype),
                    v.astype(self.sparse_k.dtype), lengths)

  def append(self, k_new, v_new) -> "S2KVCache":
    """Writes one token per sequence, k_new, v_new [B, Hkv, D], at position
    lengths[b]. Raises (eagerly) if a sequence is already at max_len."""
    want = (self.lengths.shape[0], self.pattern.num_kv_heads,
            self.sparse_k.shape[-1])
    if k_new.shape != want or v_new.shape != want:
      raise ValueError(f"k_new and v_new must be {want}, got {k_new.shape} "
                       f"and {v_new.shape}")
    lens = _concrete(self.lengths)
    if lens is not None and (lens >= self.max_len).any():
      raise ValueError(f"S2KVCache is full: sequences "
                       f"{np.flatnonzero(lens >= self.max_len).tolist()} "
                       f"already hold max_len={self.max_len} tokens")
    return _append(self, k_new.astype(self.sparse_k.dtype),
                   v_new.astype(self.sparse_k.dtype))

  def raise_if_overflowed(self) -> None:
    """Eager check for appends dropped under jit (see the module doc)."""
    over = np.asarray(self.overflowed)
    if over.any():
      raise ValueError(f"appends past max_len={self.max_len} were dropped "
                       f"for sequences {np.flatnonzero(over).tolist()}")

  # --- what decode reads -------------------------------------------------------

  def decode_views(self):
    """(sparse SlotView, dense SlotView) for the query at lengths - 1."""
    return _sparse_view(self), _dense_view(self)


def ring_slots(pattern: S2Pattern, max_len: int) -> int:
  return min(pattern.local_blocks, -(-max_len // pattern.block_size))


def strided_slots(pattern: S2Pattern, max_len: int) -> int:
  nblocks = -(-max_len // pattern.block_size)
  return max(0, -(-(nblocks - pattern.local_blocks) // pattern.vert_stride))


def capacity_kv_bytes(batch: int, max_len: int, head_dim: int, dtype,
                      pattern: S2Pattern) -> int:
  """kv_bytes() of a cache, from shapes only (allocates nothing)."""
  shapes = jax.eval_shape(lambda: S2KVCache.create(
      batch, max_len, pattern.num_kv_heads, head_dim, dtype, pattern))
  return shapes.kv_bytes()


def dense_kv_bytes(batch: int, max_len: int, num_kv_heads: int,
                   head_dim: int, dtype) -> int:
  """Bytes of K and V in an ordinary dense cache of max_len tokens."""
  return 2 * batch * max_len * num_kv_heads * head_dim * jnp.dtype(
      dtype).itemsize


# --- implementations (jitted; the pattern is static through the pytree) -------


def _residues(p: S2Pattern) -> jax.Array:
  return jnp.asarray([p.residue(g) for g in range(p.num_sparse_heads)],
                     jnp.int32)


@jax.jit
def _prefill(cache: S2KVCache, k, v, lengths) -> S2KVCache:
  p, bs = cache.pattern, cache.pattern.block_size
  b, l, _, d = k.shape
  ring, hs = cache.ring, p.num_sparse_heads
  nbl = -(-l // bs)
  cur = jnp.floor_divide(lengths - 1, bs)[:, None, None]  # last block, or -1
  # Source block of every sparse slot: the latest block of its ring class
  # (j = cur - (cur - s) mod R), then the residue class r_g + t*stride.
  s = jnp.arange(ring)[None, None, :]
  ring_src = cur - jnp.mod(cur - s, ring)
  t = jnp.arange(cache.strided)[None, None, :]
  st_src = _residues(p)[None, :, None] + p.vert_stride * t
  src = jnp.concatenate([jnp.broadcast_to(ring_src, (b, hs, ring)),
                         jnp.broadcast_to(st_src, (b, hs, cache.strided))], -1)
  valid = (src >= 0) & (src <= cur)

  def sparse(x):  # [B, L, Hkv, D] -> [B, Hs, slots * bs, D]
    xb = jnp.pad(x[:, :, :hs], ((0, 0), (0, nbl * bs - l), (0, 0), (0, 0)))
    xb = xb.reshape(b, nbl, bs, hs, d).transpose(0, 3, 1, 2, 4)
    got = jnp.take_along_axis(xb, jnp.clip(src, 0, nbl - 1)[..., None, None],
                              axis=2)
    pos = src[..., None] * bs + jnp.arange(bs)
    keep = valid[..., None] & (pos < lengths[:, None, None, None])
    return jnp.where(keep[..., None], got, 0).reshape(b, hs, -1, d)

  def dense(x):  # [B, L, Hkv, D] -> [B, Hd, nblocks * bs, D]
    xd = x[:, :, hs:].transpose(0, 2, 1, 3)
    keep = jnp.arange(l)[None, None, :, None] < lengths[:, None, None, None]
    xd = jnp.where(keep, xd, 0)
    return jnp.pad(xd, ((0, 0), (0, 0), (0, cache.dense_k.shape[2] - l),
                        (0, 0)))

  return dataclasses.replace(
      cache, sparse_k=sparse(k), sparse_v=sparse(v), dense_k=dense(k),
      dense_v=dense(v), lengths=lengths,
      overflowed=jnp.zeros_like(cache.overflowed))


@jax.jit
def _append(cache: S2KVCache, k_new, v_new) -> S2KVCache:
  p, bs = cache.pattern, cache.pattern.block_size
  b, hs = k_new.shape[0], p.num_sparse_heads
  pos = cache.lengths
  over = pos >= cache.max_len
  j, row = pos // bs, pos % bs
  # Out-of-range row indices make scatter (mode="drop") skip the write.
  drop = cache.sparse_k.shape[2]
  ring_row = jnp.where(over, drop, (j % cache.ring) * bs + row)[:, None]
  t = j // p.vert_stride
  strided = (((j[:, None] - _residues(p)[None]) % p.vert_stride == 0) &
             (t < cache.strided)[:, None] & ~over[:, None])
  st_row = jnp.where(strided, (cache.ring + t[:, None]) * bs + row[:, None],
                     drop)
  rows = jnp.stack([jnp.broadcast_to(ring_row, (b, hs)), st_row], -1)
  bi = jnp.arange(b)[:, None, None]
  gi = jnp.arange(hs)[None, :, None]

  def put_sparse(buf, x):
    vals = jnp.broadcast_to(x[:, :hs, None], (b, hs, 2, x.shape[-1]))
    return buf.at[bi, gi, rows].set(vals, mode="drop")

  dpos = jnp.where(over, cache.dense_k.shape[2], pos)[:, None]
  hd_i = jnp.arange(p.num_dense_heads)[None, :]

  def put_dense(buf, x):
    return buf.at[bi[..., 0], hd_i, dpos].set(x[:, hs:], mode="drop")

  return dataclasses.replace(
      cache, sparse_k=put_sparse(cache.sparse_k, k_new),
      sparse_v=put_sparse(cache.sparse_v, v_new),
      dense_k=put_dense(cache.dense_k, k_new),
      dense_v=put_dense(cache.dense_v, v_new),
      lengths=jnp.where(over, pos, pos + 1),
      overflowed=cache.overflowed | over)


def _sparse_view(cache: S2KVCache) -> SlotView:
  """Visit list per sparse head: out-of-window strided slots, then the ring."""
  p = cache.pattern
  ring, ns = cache.ring, cache.strided
  i = jnp.floor_divide(cache.lengths - 1, p.block_size)[:, None]  # [B, 1]
  r = _residues(p)[None]  # [1, Hs]
  # Strided blocks r + t*stride that left the window: r + t*stride <= i - local.
  x = i - p.local_blocks - r
  n_st = jnp.where(x >= 0, jnp.minimum(ns, jnp.floor_divide(
      jnp.maximum(x, 0), p.vert_stride) + 1), 0)
  first = jnp.maximum(0, i - p.local_blocks + 1)
  n_loc = jnp.maximum(0, i - first + 1)
  e = jnp.arange(ring + ns)[None, None]
  is_st = e < n_st[..., None]
  loc_block = first[..., None] + e - n_st[..., None]
  block = jnp.where(is_st, r[..., None] + p.vert_stride * e, loc_block)
  slot = jnp.where(is_st, ring + e, jnp.mod(loc_block, ring))
  return SlotView(cache.sparse_k, cache.sparse_v, slot.astype(jnp.int32),
                  block.astype(jnp.int32),
                  (n_st + n_loc).astype(jnp.int32))


def _dense_view(cache: S2KVCache) -> SlotView:
  b, hd = cache.dense_k.shape[:2]
  nblocks = cache.dense_k.shape[2] // cache.pattern.block_size
  i = jnp.floor_divide(cache.lengths - 1, cache.pattern.block_size)
  e = jnp.broadcast_to(jnp.arange(nblocks, dtype=jnp.int32), (b, hd, nblocks))
  counts = jnp.broadcast_to((i + 1)[:, None], (b, hd)).astype(jnp.int32)
  return SlotView(cache.dense_k, cache.dense_v, e, e, counts)
