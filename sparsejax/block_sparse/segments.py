"""Segment ids (packed documents, padding): block lists refined on device.

A pair (q, kv) is visible only where q_segment_ids[b, q] ==
kv_segment_ids[b, kv] (and the mask allows it). From the ids, per q block and
kv block, the min and max id (over the true lengths) classify each listed
block of the mask:
  * id ranges disjoint: no pair can match -> EMPTY (skipped, not masked);
  * both blocks one id, the same one: unchanged (full stays full);
  * otherwise a full block needs the id check: it moves to the "seg" list
    (ids checked, mask_fn not: the mask said full); a partial block stays
    partial and checks mask_fn AND the ids.
It is all jnp on traced ids with static list widths (bounded by the mask's
own widths), so a new packing neither retraces nor recompiles.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from sparsejax.block_sparse.block_mask import (BlockMask, FULL, PARTIAL,
                                               compress_traced)

# Padding beyond the true lengths: q and kv pads never match each other.
Q_PAD, KV_PAD = -1, -2
_BIG = jnp.iinfo(jnp.int32).max


def validate(q_segment_ids, kv_segment_ids, *, batch: int, q_len: int,
             kv_len: int):
  """(q ids, kv ids) as int32 [B, L], or None; ValueError/TypeError naming
  the argument. One of them alone stands for both (self-attention)."""
  if q_segment_ids is None and kv_segment_ids is None:
    return None
  if kv_segment_ids is None or q_segment_ids is None:
    if q_len != kv_len:
      missing = "kv" if kv_segment_ids is None else "q"
      raise ValueError(f"{missing}_segment_ids is needed when q_len "
                       f"({q_len}) != kv_len ({kv_len})")
    q_segment_ids = kv_segment_ids if q_segment_ids is None else q_segment_ids
    kv_segment_ids = q_segment_ids if kv_segment_ids is None else (
        kv_segment_ids)
  out = []
  for name, ids, length in (("q_segment_ids", q_segment_ids, q_len),
                            ("kv_segment_ids", kv_segment_ids, kv_len)):
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"{name} must be an integer array, got {ids.dtype}")
    if ids.shape != (batch, length):
      raise ValueError(f"{name} must be [batch={batch}, len={length}], got "
                       f"shape {ids.shape}")
    out.append(ids.astype(jnp.int32))
  return tuple(out)


def _block_ranges(ids, block: int, num_blocks: int):
  """Per block: (min, max) id over the true length, [B, n] each."""
  b, length = ids.shape
  pad = num_blocks * block - length
  lo = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=_BIG)
  hi = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=-_BIG)
  return (lo.reshape(b, num_blocks, block).min(-1),
          hi.reshape(b, num_blocks, block).max(-1))


def padded(ids, length: int, value: int):
  return jnp.pad(ids, ((0, 0), (0, length - ids.shape[1])),
                 constant_values=value)


def refine(mask: BlockMask, q_ids, kv_ids, *, batch: int, heads: int) -> dict:
  """The mask's lists refined by segment ids, [batch, heads, ...] each, plus
  the seg lists and the padded ids (see `vjp` for the layout)."""
  nq, nk = mask.num_q_blocks, mask.num_kv_blocks
  qmin, qmax = _block_ranges(q_ids, mask.block_q, nq)
  kmin, kmax = _block_ranges(kv_ids, mask.block_kv, nk)
  qmin, qmax = qmin[:, None, :, None], qmax[:, None, :, None]
  kmin, kmax = kmin[:, None, None, :], kmax[:, None, None, :]
  disjoint = (qmax < kmin) | (kmax < qmin)
  same = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
  states = mask.block_states()  # [B|1, H|1, nq, nk]
  full = (states == FULL) & same
  seg = (states == FULL) & ~same & ~disjoint
  part = (states == PARTIAL) & ~disjoint
  wf, wp = mask.full_idx.shape[-1], mask.partial_idx.shape[-1]
  wft, wpt = mask.full_idx_t.shape[-1], mask.partial_idx_t.shape[-1]
  lists = {}
  for name, member, width, width_t in (("full", full, wf, wft),
                                       ("partial", part, wp, wpt),
                                       ("seg", seg, wf, wft)):
    c, i = compress_traced(member, width)
    ct, it = compress_traced(jnp.swapaxes(member, -1, -2), width_t)
    lists.update({f"{name}_counts": c, f"{name}_idx": i,
                  f"{name}_counts_t": ct, f"{name}_idx_t": it})
  lists = {f: jnp.broadcast_to(x, (batch, heads) + x.shape[2:])
           for f, x in lists.items()}
  lists["q_segments"] = padded(q_ids, nq * mask.block_q, Q_PAD)
  lists["kv_segments"] = padded(kv_ids, nk * mask.block_kv, KV_PAD)
  return lists


def visible(q_ids: Optional[jax.Array], kv_ids: Optional[jax.Array]):
  """Dense [B, 1, Lq, Lk] id equality (the reference's definition)."""
  return q_ids[:, None, :, None] == kv_ids[:, None, None, :]
