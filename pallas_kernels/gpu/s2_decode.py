"""Decode attention over a compacted, slot-addressed KV cache (Triton).

One new query token per sequence. A program owns (batch, kv head, split): it
loads the kv head's q heads as one [group_pad, D] tile (padded to >= 16 rows
so the dots are legal MMA shapes), walks its share of the head's visit list
(slot indices into the compacted cache) with a flash-attention online softmax,
and writes a normalised partial output plus its lse. Split-K over the list
keeps the GPU busy at small batch x heads; `combine_splits` merges the parts.
The element mask is causality against the query position (only the current,
partly filled block has masked keys). `sparsejax.inference.s2_decode` holds
the plain-jnp twin of this algorithm and the entry point.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from sparsejax.block_sparse import block_math
from sparsejax.block_sparse.block_mask import next_power_of_2



def _kernel(cnt_ref, slot_ref, blk_ref, pos_ref, q_ref, k_ref, v_ref, o_ref,
            lse_ref, *, block, splits, scale):
  split = pl.program_id(2)
  count, q_pos = cnt_ref[...], pos_ref[...]
  # Contiguous share of the list; lax.div (truncation) as operands are >= 0.
  per = jax.lax.div(count + splits - 1, splits)
  lo = jnp.minimum(split * per, count)
  hi = jnp.minimum(lo + per, count)
  q = q_ref[...]
  rows, d = q.shape

  def body(e, carry):
    start = pl.multiple_of(slot_ref[e] * block, block)
    s = block_math.scores(q, k_ref[pl.ds(start, block), :], scale, None)
    kv_pos = blk_ref[e] * block + jax.lax.broadcasted_iota(
        jnp.int32, (rows, block), 1)
    return block_math.online_softmax_step(
        s, v_ref[pl.ds(start, block), :], *carry, kv_pos <= q_pos)

  carry = (jnp.full((rows,), -jnp.inf, jnp.float32),
           jnp.zeros((rows,), jnp.float32), jnp.zeros((rows, d), jnp.float32))
  out, lse = block_math.finalize(*jax.lax.fori_loop(lo, hi, body, carry),
                                 jnp.float32)
  o_ref[...] = out
  lse_ref[...] = lse


def decode_slots(q, k, v, slot_idx, block_idx, counts, q_pos, *, block: int,
                 scale: float, num_splits: int = 1, num_warps: int = 4,
                 num_stages: int = 2, interpret: bool = False):
  """Per-split partial attention.

  q: [B, G, group, D]; k, v: [B, G, slots*block, D]; slot_idx, block_idx:
  int32 [B, G, W]; counts: int32 [B, G]; q_pos: int32 [B] (the query's
  absolute position). Returns out [B, G, splits, rows, D] f32 (normalised
  per split) and lse [B, G, splits, rows], rows = max(16, pow2(group)).
  """
  b, g, group, d = q.shape
  if d < 16 or d & (d - 1):
    raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
  if block < 16 or block & (block - 1):
    raise ValueError(f"block must be a power of two >= 16, got {block}")
  if num_splits < 1 or num_splits & (num_splits - 1):
    raise ValueError(f"num_splits must be a power of two, got {num_splits}")
  rows = max(16, next_power_of_2(group))
  q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
  w = next_power_of_2(slot_idx.shape[-1])
  pad = ((0, 0), (0, 0), (0, w - slot_idx.shape[-1]))
  slot_idx = jnp.pad(slot_idx, pad, mode="edge")
  block_idx = jnp.pad(block_idx, pad, mode="edge")
  q_pos = jnp.broadcast_to(q_pos[:, None], (b, g)).astype(jnp.int32)
  n = k.shape[2]
  scalar = pl.BlockSpec((None, None), lambda i, h, s: (i, h))
  lst = pl.BlockSpec((None, None, w), lambda i, h, s: (i, h, 0))
  kv = pl.BlockSpec((None, None, n, d), lambda i, h, s: (i, h, 0, 0))
  return pl.pallas_call(
      functools.partial(_kernel, block=block, splits=num_splits,
                        scale=scale),
      grid=(b, g, num_splits),
      in_specs=[scalar, lst, lst, scalar,
                pl.BlockSpec((None, None, rows, d),
                             lambda i, h, s: (i, h, 0, 0)), kv, kv],
      out_specs=[
          pl.BlockSpec((None, None, None, rows, d),
                       lambda i, h, s: (i, h, s, 0, 0)),
          pl.BlockSpec((None, None, None, rows), lambda i, h, s: (i, h, s, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((b, g, num_splits, rows, d),
                                      jnp.float32),
                 jax.ShapeDtypeStruct((b, g, num_splits, rows), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps,
                                              num_stages=num_stages),
      interpret=interpret,
      name="sparsejax_s2_decode",
  )(counts, slot_idx, block_idx, q_pos, q, k, v)


def combine_splits(out, lse, group: int, dtype):
  """Merges per-split parts: [B, G, S, rows, D] -> [B, G, group, D]."""
  m = lse.max(2, keepdims=True)
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  w = jnp.exp(lse - m_safe)  # 0 for empty splits
  den = w.sum(2)
  num = (w[..., None] * out).sum(2)
  res = jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[
      ..., None], 0.0)
  return res[:, :, :group].astype(dtype)
