"""Causal prefill BlockMasks straight from kept-block lists.

SeerAttention and MInference keep, per (batch, head, q block i), a few kv
blocks j < i chosen from data, plus the diagonal (always kept). Building
their masks with `masks.from_block_mask(blocks, mask_fn=Causal())` costs a
mask_fn evaluation over every (query, key) element of every head and four
compressions of [nq, nk] block states: at 128K tokens that was ~0.9 s on an
H200 against 24-190 ms of attention. Here the lists are made directly:

* full lists: the kept blocks strictly below the diagonal, sorted, from the
  methods' indices (top-k, vertical and slash picks) by `sorted_lists`: a
  sort over k, not a pass over nk;
* partial lists: the diagonal block alone (causal inside it), so no
  element-mask evaluation at all;
* the last `dense_rows` q-block rows (Seer's forced rows) keep every block;
* transposed lists (dK/dV only; a jitted prefill never computes them) by
  `transpose_lists`: one sort of the listed pairs.

The element mask equals `from_block_mask(blocks, mask_fn=Causal())`'s (a
1-token last block is listed partial rather than full: same attention).
Self-attention only (q_len == kv_len, square blocks).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from sparsejax.block_sparse import mask_fns
from sparsejax.block_sparse import masks as masks_lib
from sparsejax.block_sparse.block_mask import BlockMask
from sparsejax.block_sparse.block_mask import compress
from sparsejax.block_sparse.block_mask import sorted_lists
from sparsejax.block_sparse.block_mask import transpose_lists


def num_blocks(length: int, block_size: int) -> int:
  return -(-length // block_size)


def below_diagonal(cand, valid=True, *, unique: bool = False,
                   width: Optional[int] = None):
  """(counts, idx) of the candidates j < i of each q-block row i.

  cand int [B, H, nq, C] (any order; duplicates dropped unless unique),
  valid bool broadcast to it. Entries at or above the diagonal drop out.
  """
  cand = jnp.asarray(cand)
  rows = jnp.arange(cand.shape[-2], dtype=jnp.int32)[:, None]
  keep = jnp.asarray(valid, bool) & (cand >= 0) & (cand < rows)
  return sorted_lists(cand, keep, width, unique=unique)


def static_below_diagonal(blocks: np.ndarray):
  """(counts, idx) [1, 1, nq(, W)] of a concrete bool [nq, nk] pattern's
  blocks below the diagonal (width: the true maximum)."""
  blocks = np.asarray(blocks, bool)
  strict = blocks & np.tri(*blocks.shape, -1, dtype=bool)
  return compress(strict[None, None])


def causal_mask_from_lists(counts, idx, *, block_size: int, q_len: int,
                           dense_rows: int = 0,
                           width: Optional[int] = None) -> BlockMask:
  """The causal BlockMask of the listed blocks + the diagonal.

  Args:
    counts, idx: int32 [B|1, H|1, nq] and [B|1, H|1, nq, W]: each row's kept
      kv blocks strictly below the diagonal, sorted, unique
      (`below_diagonal`).
    block_size: the (square) block.
    q_len: the sequence length (q and kv).
    dense_rows: the last q-block rows keep every causal block (Seer's
      `last_dense`), whatever the lists say.
    width: pad the forward lists to at least this width.
  """
  masks_lib._check_block_size(block_size)  # pylint: disable=protected-access
  nq = num_blocks(q_len, block_size)
  counts, idx = jnp.asarray(counts, jnp.int32), jnp.asarray(idx, jnp.int32)
  if counts.ndim != 3 or idx.ndim != 4 or counts.shape[2] != nq:
    raise ValueError(f"counts / idx must be [B|1, H|1, {nq}] and "
                     f"[B|1, H|1, {nq}, W], got {counts.shape} and "
                     f"{idx.shape}")
  lead = tuple(max(a, b) for a, b in zip(counts.shape[:2], idx.shape[:2]))
  counts = jnp.broadcast_to(counts, lead + (nq,))
  idx = jnp.broadcast_to(idx, lead + idx.shape[2:])
  rows = jnp.arange(nq, dtype=jnp.int32)
  dense_rows = min(max(int(dense_rows), 0), nq)
  first_dense = nq - dense_rows
  is_dense = rows >= first_dense
  # Transposed full lists: the listed (sparse-row) pairs by a sort, then
  # each column's dense rows, a range after them.
  sparse_counts = jnp.where(is_dense, 0, counts)
  ct, it = transpose_lists(sparse_counts, idx, nq)
  if dense_rows:
    tail_start = jnp.maximum(first_dense, rows + 1)  # column j: rows > j
    tail = nq - tail_start
    t = jnp.arange(nq, dtype=jnp.int32)
    # Past the count this repeats the last tail row, as the lists pad.
    in_tail = (t >= ct[..., None]) & (tail[:, None] > 0)
    it = jnp.where(in_tail, jnp.minimum(
        tail_start[:, None] + t - ct[..., None], nq - 1), it)
    ct = ct + tail
  if dense_rows:
    w = max(idx.shape[-1], nq - 1, 1)
    idx = jnp.pad(idx, ((0, 0), (0, 0), (0, 0), (0, w - idx.shape[-1])))
    dense_idx = jnp.minimum(jnp.arange(w, dtype=jnp.int32),
                            jnp.maximum(rows - 1, 0)[:, None])
    idx = jnp.where(is_dense[:, None], dense_idx, idx)
    counts = jnp.where(is_dense, rows, counts)
  diag = jnp.broadcast_to(rows[:, None], lead + (nq, 1))
  ones = jnp.ones(lead + (nq,), jnp.int32)
  return BlockMask.from_lists(
      counts, idx, ones, diag, block_q=block_size, block_kv=block_size,
      q_len=q_len, kv_len=q_len, mask_fn=mask_fns.Causal(),
      full_t=(ct, it), partial_t=(ones, diag), width=width)


def causal_mask_from_blocks(blocks, *, block_size: int,
                            q_len: int) -> BlockMask:
  """The same mask from a bool kept-block array [B|1, H|1, nq, nq] (e.g.
  a threshold selection): one compression of its lower part."""
  blocks = jnp.asarray(blocks, bool)
  nq = blocks.shape[-1]
  strict = blocks & (jnp.arange(nq)[None, :] < jnp.arange(nq)[:, None])
  counts, idx = compress(strict)
  return causal_mask_from_lists(counts, idx, block_size=block_size,
                                q_len=q_len)


def causal_density(mask: BlockMask):
  """Kept fraction of the causal block pairs per [B|1, H|1]."""
  nq = mask.num_q_blocks
  kept = mask.full_counts.sum(-1) + mask.partial_counts.sum(-1)
  return kept / (nq * (nq + 1) // 2)
