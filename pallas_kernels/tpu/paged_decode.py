"""Decode over paged visit lists for TPU: scalar-prefetch page lists.

The lists (counts, limits, physical pages, logical pages) are scalar-prefetch
operands in SMEM; the k/v BlockSpec index_maps read the page id of grid step
(b, list head, entry), so the pipeline DMAs exactly the listed pages, double
buffered, from the pool [Hkv, P, page, D] in HBM. Steps past a list's count
name its last listed page (already resident: no DMA) and compute nothing.
The running max, sum and accumulator live in VMEM across the "arbitrary"
entry axis; the (b, list head) axes are "parallel" (megacore). GQA: a list
head's q heads are the rows of one tile. No split-K: on TPU the grid is
sequential per core and the entry axis is the reduction.

`sparsejax.inference.paged_decode.decode_reference` is the definition this
must match; `decode_xla` is the same algorithm in jnp.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sparsejax.block_sparse import block_math

NUM_LANES = 128
NUM_SUBLANES = 8


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Compiler settings (the page is the tile: no block sizes to choose)."""
  megacore: bool = True
  vmem_limit_bytes: Optional[int] = None
  smem_budget_bytes: int = 512 * 1024  # for the four list operands

  def __post_init__(self):
    if not isinstance(self.megacore, bool):
      raise ValueError(f"megacore must be a bool, got {self.megacore!r}")
    if self.vmem_limit_bytes is not None and (
        not isinstance(self.vmem_limit_bytes, int)
        or self.vmem_limit_bytes < (1 << 20)):
      raise ValueError(f"vmem_limit_bytes must be None or an int >= 1 MiB, "
                       f"got {self.vmem_limit_bytes!r}")
    if not isinstance(self.smem_budget_bytes, int) or not (
        1024 <= self.smem_budget_bytes <= (1 << 20)):
      raise ValueError(f"smem_budget_bytes must be an int in [1 KiB, 1 MiB],"
                       f" got {self.smem_budget_bytes!r}")


def unsupported(dtype, head_dim, page, list_heads, rows, width, interpret,
                batch=None):
  """Why the kernel cannot run a problem on hardware (None if it can)."""
  del dtype, rows
  if interpret:
    return None
  if head_dim % NUM_LANES:
    return f"needs head_dim a multiple of {NUM_LANES}, got {head_dim}"
  if page % NUM_LANES:
    return (f"needs pages of a multiple of {NUM_LANES} tokens (the score "
            f"tile's lanes), got {page}; token lists (page 1) use xla")
  if batch is not None and 2 * 4 * batch * list_heads * width > (
      TuningConfig().smem_budget_bytes):
    return "the page lists do not fit the SMEM budget"
  return None


def _kernel(cnt_ref, lim_ref, pg_ref, lg_ref, q_ref, k_ref, v_ref, o_ref,
            *refs, page, scale, group, return_scores):
  b, g, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  score_ref = refs[0] if return_scores else None
  m_ref, l_ref, acc_ref = refs[-3:]
  rows = q_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  listed = j < cnt_ref[b, g]

  @pl.when(listed)
  def _step():
    s = block_math.scores(q_ref[...], k_ref[...], scale, None)
    pos = lg_ref[b, g, j] * page + jax.lax.broadcasted_iota(
        jnp.int32, (rows, page), 1)
    vis = pos < lim_ref[b, g]
    m, l, acc = block_math.online_softmax_step(
        s, v_ref[...], m_ref[...][:, 0], l_ref[...][:, 0], acc_ref[...], vis)
    m_ref[...] = m[:, None]
    l_ref[...] = l[:, None]
    acc_ref[...] = acc
    if return_scores:
      row = jax.lax.broadcasted_iota(jnp.int32, (rows, page), 0)
      best = jnp.where(vis & (row < group), s, -jnp.inf).max(0)
      score_ref[...] = (best * block_math.LN2)[None]

  if return_scores:
    @pl.when(~listed)
    def _unlisted():
      score_ref[...] = jnp.full(score_ref.shape, -jnp.inf, jnp.float32)

  @pl.when(j == pl.num_programs(2) - 1)
  def _finish():
    out, _ = block_math.finalize(m_ref[...][:, 0], l_ref[...][:, 0],
                                 acc_ref[...], o_ref.dtype)
    o_ref[...] = out


def decode(q, k_pages, v_pages, lists, *, scale, tuning=None,
           return_scores=False, interpret=False):
  """q [B, H, D] over lists with Hg list heads -> [B, H, D] (q.dtype)."""
  tuning = tuning or TuningConfig()
  if not isinstance(tuning, TuningConfig):
    raise ValueError(f"tuning for impl='pallas_tpu' must be a pallas_kernels."
                     f"tpu.paged_decode.TuningConfig, got "
                     f"{type(tuning).__name__}")
  b, h, d = q.shape
  hkv, _, page, _ = k_pages.shape
  hg, w = lists.pages.shape[1], lists.pages.shape[2]
  group = h // hg
  reason = unsupported(q.dtype, d, page, hg, group, w, interpret, batch=b)
  if reason is not None:
    raise ValueError(f"impl='pallas_tpu' {reason}")
  per_kv = hg // hkv
  rows = group if interpret else -(-group // NUM_SUBLANES) * NUM_SUBLANES
  qg = jnp.pad(q.reshape(b, hg, group, d),
               ((0, 0), (0, 0), (0, rows - group), (0, 0)))

  def kv_map(i, g, j, cnt, lim, pg, lg):
    del lim, lg
    last = jnp.maximum(cnt[i, g] - 1, 0)
    return g // per_kv, pg[i, g, jnp.minimum(j, last)], 0, 0

  row_map = lambda i, g, j, *_: (i, g, 0, 0)
  out_specs = [pl.BlockSpec((None, None, rows, d), row_map)]
  out_shape = [jax.ShapeDtypeStruct((b, hg, rows, d), q.dtype)]
  if return_scores:
    out_specs.append(pl.BlockSpec((None, None, 1, page),
                                  lambda i, g, j, *_: (i, g, j, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, hg, w, page), jnp.float32))
  par = "parallel" if tuning.megacore else "arbitrary"
  outs = pl.pallas_call(
      functools.partial(_kernel, page=page, scale=scale, group=group,
                        return_scores=return_scores),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(b, hg, w),
          in_specs=[pl.BlockSpec((None, None, rows, d), row_map),
                    pl.BlockSpec((None, None, page, d), kv_map),
                    pl.BlockSpec((None, None, page, d), kv_map)],
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32),
                          pltpu.VMEM((rows, 1), jnp.float32),
                          pltpu.VMEM((rows, d), jnp.float32)]),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(par, par, "arbitrary"),
          vmem_limit_bytes=tuning.vmem_limit_bytes),
      interpret=(pltpu.InterpretParams(detect_races=True) if interpret is True
                 else interpret),
      name="sparsejax_paged_decode_tpu",
  )(lists.counts.astype(jnp.int32), lists.limits.astype(jnp.int32),
    lists.pages.astype(jnp.int32), lists.logical.astype(jnp.int32), qg,
    k_pages, v_pages)
  out = outs[0][:, :, :group].reshape(b, h, d)
  if not return_scores:
    return out
  return out, outs[1].reshape(b, hg, w * page)
