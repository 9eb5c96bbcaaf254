"""Split-KV decode over paged visit lists (Pallas, Triton lowering).

One query token per sequence. A program owns (batch, list head, split): it
holds the list head's q heads as the rows of one [rows, D] tile (GQA: a kv
head's whole group, padded to >= 16 rows so the dots are MMA shapes) and
walks its contiguous share of the list `block_tokens` tokens at a time:
the ids of `block_tokens / page` list entries are one vector load and their
pages one gathered [block, D] load (`k_ref[ids]`, a pointer gather; token
lists use page 1, so a step gathers block_tokens rows). Online softmax in
base 2 (`block_math`), a normalised partial output and its lse per split,
merged by `s2_decode.combine_splits`.

Why this layout reaches the HBM floor where the S2 kernel did not (2.1-3.4
TB/s): a step reads a whole block (e.g. 8 pages of 16 or 2 of 64 tokens)
instead of one 64-token slot, so each program keeps num_stages blocks of
K and V in flight; and the split count is chosen so that there are several
waves of programs (~1024 by default), which bounds the idle tail of the last
wave that a 512-program grid leaves on 132 SMs.

`sparsejax.inference.paged_decode.decode_xla` is the twin of this algorithm,
`decode_reference` the definition it must match.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gpu import s2_decode
from sparsejax.block_sparse import block_math
from sparsejax.block_sparse.block_mask import next_power_of_2


def _pow2(x) -> bool:
  return isinstance(x, int) and x >= 1 and not x & (x - 1)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Tokens per step, split count, warps and pipeline stages.

  block_tokens: tokens loaded per loop step (a power of two >= 16 and >=
    the page size); None: 128.
  num_splits: split-K programs per list (a power of two); None: about
    `target_programs` programs in all, at least `min_steps` steps each.
  """
  block_tokens: Optional[int] = None
  num_splits: Optional[int] = None
  num_warps: int = 4
  num_stages: int = 2
  target_programs: int = 1024
  min_steps: int = 2

  def __post_init__(self):
    if self.block_tokens is not None and (not _pow2(self.block_tokens) or
                                          self.block_tokens < 16):
      raise ValueError(f"block_tokens must be a power of two >= 16, got "
                       f"{self.block_tokens!r}")
    if self.num_splits is not None and not _pow2(self.num_splits):
      raise ValueError(f"num_splits must be a power of two, got "
                       f"{self.num_splits!r}")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got "
                       f"{self.num_warps!r}")
    if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 6:
      raise ValueError(f"num_stages must be an int in [1, 6], got "
                       f"{self.num_stages!r}")
    for name in ("target_programs", "min_steps"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive int, got "
                         f"{getattr(self, name)!r}")

  def block(self, page: int) -> int:
    bt = self.block_tokens or max(128, page)
    if bt < page:
      raise ValueError(f"block_tokens={bt} must be >= the page size {page}")
    return bt

  def splits(self, rows_total: int, steps: int) -> int:
    """Split count for rows_total lists of up to `steps` loop steps."""
    if self.num_splits is not None:
      return self.num_splits
    want = next_power_of_2(-(-self.target_programs // max(rows_total, 1)))
    cap = max(1, steps // self.min_steps)
    return min(want, 1 << (cap.bit_length() - 1), 256)


def unsupported(dtype, head_dim, page, list_heads, rows, width, interpret):
  """Why the kernel cannot run a problem (None if it can)."""
  del dtype, list_heads, rows, width, interpret
  if not _pow2(head_dim) or head_dim < 16:
    return f"needs head_dim a power of two >= 16, got {head_dim}"
  if not _pow2(page) or page > 256:
    return f"needs a power-of-two page size <= 256, got {page}"
  return None


def _kernel(cnt_ref, lim_ref, pages_ref, logical_ref, q_ref, k_ref, v_ref,
            o_ref, lse_ref, *score_ref, ppb, page, splits, scale, group):
  split = pl.program_id(2)
  count, limit = cnt_ref[...], lim_ref[...]
  # Each split takes a contiguous, ppb-aligned share of the list (truncating
  # lax.div: the operands are >= 0).
  per = jax.lax.div(jax.lax.div(count + splits - 1, splits) + ppb - 1,
                    ppb) * ppb
  lo = jnp.minimum(split * per, count)
  hi = jnp.minimum(lo + per, count)
  q = q_ref[...]
  rows, d = q.shape
  bk = ppb * page

  def body(i, carry):
    e0 = lo + i * ppb
    ids = pages_ref[pl.ds(e0, ppb)]
    lg = logical_ref[pl.ds(e0, ppb)]
    k = k_ref[ids].reshape(bk, d)
    v = v_ref[ids].reshape(bk, d)
    s = block_math.scores(q, k, scale, None)
    entry = e0 + jax.lax.broadcasted_iota(jnp.int32, (ppb, page), 0)
    pos = lg[:, None] * page + jax.lax.broadcasted_iota(
        jnp.int32, (ppb, page), 1)
    vis = ((entry < hi) & (pos < limit)).reshape(1, bk)
    vis = jnp.broadcast_to(vis, (rows, bk))
    if score_ref:
      row = jax.lax.broadcasted_iota(jnp.int32, (rows, bk), 0)
      best = jnp.where(vis & (row < group), s, -jnp.inf).max(0)
      score_ref[0][pl.ds(e0 * page, bk)] = best * block_math.LN2
    return block_math.online_softmax_step(s, v, *carry, vis)

  carry = (jnp.full((rows,), -jnp.inf, jnp.float32),
           jnp.zeros((rows,), jnp.float32), jnp.zeros((rows, d), jnp.float32))
  steps = jax.lax.div(hi - lo + ppb - 1, ppb)
  out, lse = block_math.finalize(*jax.lax.fori_loop(0, steps, body, carry),
                                 jnp.float32)
  o_ref[...] = out
  lse_ref[...] = lse


def decode_parts(q, k_pages, v_pages, lists, *, scale, tuning=None,
                 return_scores=False, interpret=False):
  """Per-split partial outputs.

  q [B, Hg, group, D]; pools [Hkv, P, page, D]; lists with Hg list heads.
  Returns out [B, Hg, S, rows, D] f32 (normalised per split), lse
  [B, Hg, S, rows] and, with return_scores, scores [B, Hg, Wpad * page].
  """
  tuning = tuning or TuningConfig()
  b, hg, group, d = q.shape
  hkv, npool, page, _ = k_pages.shape
  per_kv = hg // hkv
  bt = tuning.block(page)
  ppb = bt // page
  w = lists.pages.shape[-1]
  steps = -(-w // ppb)
  splits = tuning.splits(b * hg, steps)
  # Room for every split's last (ppb-aligned) step; Triton wants powers of 2.
  per_max = -(-(-(-w // splits)) // ppb) * ppb
  wpad = next_power_of_2(max(splits * per_max, w))
  pad = ((0, 0), (0, 0), (0, wpad - w))
  pages = jnp.pad(lists.pages, pad, mode="edge")
  logical = jnp.pad(lists.logical, pad, mode="edge")
  rows = max(16, next_power_of_2(group))
  q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
  scalar = pl.BlockSpec((None, None), lambda i, g, s: (i, g))
  lst = pl.BlockSpec((None, None, wpad), lambda i, g, s: (i, g, 0))
  pool = pl.BlockSpec((None, npool, page, d),
                      lambda i, g, s: (g // per_kv, 0, 0, 0))
  out_specs = [
      pl.BlockSpec((None, None, None, rows, d), lambda i, g, s: (i, g, s, 0, 0)),
      pl.BlockSpec((None, None, None, rows), lambda i, g, s: (i, g, s, 0))]
  out_shape = [jax.ShapeDtypeStruct((b, hg, splits, rows, d), jnp.float32),
               jax.ShapeDtypeStruct((b, hg, splits, rows), jnp.float32)]
  if return_scores:
    out_specs.append(pl.BlockSpec((None, None, wpad * page),
                                  lambda i, g, s: (i, g, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, hg, wpad * page), jnp.float32))
  return pl.pallas_call(
      functools.partial(_kernel, ppb=ppb, page=page, splits=splits,
                        scale=scale, group=group),
      grid=(b, hg, splits),
      in_specs=[scalar, scalar, lst, lst,
                pl.BlockSpec((None, None, rows, d),
                             lambda i, g, s: (i, g, 0, 0)), pool, pool],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps,
                                              num_stages=tuning.num_stages),
      interpret=interpret,
      name="sparsejax_paged_decode",
  )(lists.counts.astype(jnp.int32), lists.limits.astype(jnp.int32),
    pages.astype(jnp.int32), logical.astype(jnp.int32), q, k_pages, v_pages)


def decode(q, k_pages, v_pages, lists, *, scale, tuning=None,
           return_scores=False, interpret=False):
  """q [B, H, D] over lists with Hg list heads -> [B, H, D] (q.dtype)."""
  b, h, d = q.shape
  hg = lists.pages.shape[1]
  reason = unsupported(q.dtype, d, k_pages.shape[2], hg, h // hg,
                       lists.pages.shape[-1], interpret)
  if reason is not None:
    raise ValueError(f"impl='pallas_triton' {reason}")
  group = h // hg
  parts = decode_parts(q.reshape(b, hg, group, d), k_pages, v_pages, lists,
                       scale=scale, tuning=tuning, interpret=interpret,
                       return_scores=return_scores)
  out = s2_decode.combine_splits(parts[0], parts[1], group, jnp.float32)
  out = out.reshape(b, h, d).astype(q.dtype)
  if not return_scores:
    return out
  w = lists.pages.shape[-1] * k_pages.shape[2]
  # Slots past a list's count were never written: mask them here.
  page = k_pages.shape[2]
  slot = jnp.arange(w) // page
  vis = (slot[None, None] < lists.counts[..., None]) & (
      jnp.take_along_axis(lists.logical, jnp.broadcast_to(
          slot, lists.logical.shape[:2] + slot.shape), -1) * page
      + jnp.arange(w) % page < lists.limits[..., None])
  return out, jnp.where(vis, parts[2][..., :w], -jnp.inf)
