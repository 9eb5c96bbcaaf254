"""Block-sparse flash attention for GPU: Pallas with the Triton lowering.

Forward and dQ programs own one (q block, head, batch) and walk that row's
full then partial kv-block lists; dK/dV programs own one (kv block, q head,
batch) and walk the transposed lists. Lists are ordinary inputs read inside
the kernel (the GPU backends have no scalar prefetch) and trip counts come
from the counts. Full blocks skip all element-mask work. GQA: dK/dV are
computed per q head and summed per kv head outside the kernel.

`attention` (bottom) is the custom_vjp entry used by sparsejax.attention;
`sparsejax.reference.attention_reference` is the definition it must match.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from sparsejax.block_sparse import block_math
from sparsejax.block_sparse.block_mask import next_power_of_2
from sparsejax.block_sparse.vjp import make_vjp



@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Warps, stages and sub-tiles; the list blocks come from the BlockMask.

  A mask block can be walked in smaller sub-tiles: the forward splits each kv
  block into `sub_kv_fwd` columns, dQ each kv block into `sub_kv_dq` columns
  and dK/dV each q block into `sub_q_dkv` rows (as Triton's fused attention
  tutorial does), which keeps register pressure down at head_dim 128.
  None means the whole block (capped at 32 for the backward sub-tiles).
  """
  # Defaults from a sweep on the H200 (S2 32K, head_dim 128; see
  # benchmarks/attention/NOTES.md). None: derived from head_dim.
  num_warps_fwd: Optional[int] = None  # 4 for head_dim <= 64, else 8
  num_stages_fwd: Optional[int] = None  # 3, or 1 at head_dim 256 (SMEM)
  num_warps_bwd: Optional[int] = None
  num_stages_bwd: int = 2
  sub_kv_fwd: Optional[int] = None
  sub_kv_dq: Optional[int] = None
  sub_q_dkv: Optional[int] = None

  def sub(self, name: str, block: int) -> int:
    v = getattr(self, name)
    if v is None:
      v = block if name == "sub_kv_fwd" else min(block, 32)
    if v < 16 or v & (v - 1) or block % v:
      raise ValueError(f"{name} must be a power of two >= 16 dividing the "
                       f"block ({block}), got {v}")
    return v

  def __post_init__(self):
    for name in ("num_warps_fwd", "num_warps_bwd"):
      w = getattr(self, name)
      if w is not None and (w < 1 or w & (w - 1) or w > 16):
        raise ValueError(f"{name} must be a power of two in [1, 16], got {w}")
    for name in ("num_stages_fwd", "num_stages_bwd"):
      if getattr(self, name) is not None and not 1 <= getattr(self, name) <= 8:
        raise ValueError(f"{name} must be in [1, 8], got "
                         f"{getattr(self, name)}")

  def stages_fwd(self, head_dim: int) -> int:
    if self.num_stages_fwd is not None:
      return self.num_stages_fwd
    return 3 if head_dim <= 128 else 1

  def warps(self, which: str, head_dim: int) -> int:
    w = getattr(self, f"num_warps_{which}")
    return w if w is not None else (4 if head_dim <= 64 else 8)


def validate_blocks(block_q: int, block_kv: int, head_dim: int) -> None:
  for name, b in (("block_q", block_q), ("block_kv", block_kv)):
    if b < 16 or b > 256 or b & (b - 1):
      raise ValueError(f"pallas_triton needs {name} a power of two in "
                       f"[16, 256], got {b}")
    # Measured on the H200: head_dim 256 with 128-wide tiles asks for ~300 KB
    # of shared memory (the SM has 227 KB).
    if head_dim > 128 and b > 64:
      raise ValueError(f"pallas_triton at head_dim {head_dim} needs {name} <= "
                       f"64 (shared memory); build the mask with "
                       f"block_size=64, got {b}")
  if head_dim & (head_dim - 1):
    raise ValueError(f"head_dim must be padded to a power of two, got "
                     f"{head_dim}")


def _row_lists(fc_ref, fi_ref, pc_ref, pi_ref, cfg):
  out = [(fc_ref, fi_ref, None)]
  if cfg.mask_fn is not None:
    out.append((pc_ref, pi_ref, cfg.mask_fn))
  return out


def _walk(cnt_ref, idx_ref, block, sub, body, carry):
  """Runs body(start, carry) over every `sub`-sized tile of the listed blocks.

  One flat loop over (list entry, sub-tile) pairs, so Triton can pipeline the
  tile loads across entries (num_stages) instead of seeing unrolled code.
  """
  nsub = block // sub

  def step(t, c):
    # nsub is a power of two; shifts avoid floor-division sign fix-ups that
    # the Triton lowering rejects.
    shift = nsub.bit_length() - 1
    entry, part = jnp.right_shift(t, shift), jnp.bitwise_and(t, nsub - 1)
    return body(pl.multiple_of(idx_ref[entry] * block + part * sub, sub), c)

  return jax.lax.fori_loop(0, cnt_ref[...] * nsub, step, carry)


def _program_ids(nq_rev: Optional[int]):
  i, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  if nq_rev is not None:  # heaviest (last) q blocks first: better tail balance
    i = nq_rev - 1 - i
  return b, h, i


# --- forward ----------------------------------------------------------------


def _fwd_kernel(fc_ref, fi_ref, pc_ref, pi_ref, q_ref, k_ref, v_ref, o_ref,
                lse_ref, *, cfg, nq, sk):
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, i = _program_ids(nq)
  ragged = cfg.kv_len % bk != 0
  q = q_ref[...]
  carry = (jnp.full((bq,), -jnp.inf, jnp.float32),
           jnp.zeros((bq,), jnp.float32),
           jnp.zeros((bq, v_ref.shape[-1]), jnp.float32))
  for cnt_ref, idx_ref, fn in _row_lists(fc_ref, fi_ref, pc_ref, pi_ref, cfg):

    def body(start, c, fn=fn):
      s = block_math.scores(q, k_ref[pl.ds(start, sk), :], cfg.scale,
                            cfg.soft_cap)
      vis = block_math.element_mask(fn, b, h, i * bq, start, bq, sk,
                                    cfg.kv_len, ragged)
      return block_math.online_softmax_step(s, v_ref[pl.ds(start, sk), :], *c,
                                            vis)

    carry = _walk(cnt_ref, idx_ref, bk, sk, body, carry)
  out, lse = block_math.finalize(*carry, o_ref.dtype)
  o_ref[...] = out
  lse_ref[...] = lse


def _list_specs(width_f, width_p, index):
  """BlockSpecs of (full count, full idx, partial count, partial idx)."""
  cnt = pl.BlockSpec((None, None, None), lambda *g: index(*g))
  return [cnt, pl.BlockSpec((None, None, None, width_f),
                            lambda *g: index(*g) + (0,)),
          cnt, pl.BlockSpec((None, None, None, width_p),
                            lambda *g: index(*g) + (0,))]


def _pad_width(idx):
  w = next_power_of_2(idx.shape[-1])
  return jnp.pad(idx, [(0, 0)] * (idx.ndim - 1) + [(0, w - idx.shape[-1])],
                 mode="edge")


def forward(q, k, v, lists, cfg):
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  group = h // hkv
  bq = cfg.block_q
  nq = lq // bq
  validate_blocks(bq, cfg.block_kv, d)
  tuning = cfg.tuning or TuningConfig()
  fi, pi = lists["full_idx"], lists["partial_idx"]
  row = lambda i, hh, bb: (bb, hh, nq - 1 - i)
  in_specs = _list_specs(fi.shape[-1], pi.shape[-1], row) + [
      pl.BlockSpec((None, bq, None, d), lambda i, hh, bb: (bb, nq - 1 - i, hh,
                                                           0)),
      pl.BlockSpec((None, lk, None, d), lambda i, hh, bb: (bb, 0, hh // group,
                                                           0)),
      pl.BlockSpec((None, lk, None, d), lambda i, hh, bb: (bb, 0, hh // group,
                                                           0)),
  ]
  out_specs = [
      pl.BlockSpec((None, bq, None, d), lambda i, hh, bb: (bb, nq - 1 - i, hh,
                                                           0)),
      pl.BlockSpec((None, None, bq), row),
  ]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, nq=nq,
                        sk=tuning.sub("sub_kv_fwd", cfg.block_kv)),
      grid=(nq, h, b),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq), jnp.float32)],
      compiler_params=pltriton.CompilerParams(
          num_warps=tuning.warps("fwd", d), num_stages=tuning.stages_fwd(d)),
      interpret=cfg.interpret,
      name="sparsejax_block_sparse_fwd",
  )(lists["full_counts"], fi, lists["partial_counts"], pi, q, k, v)


# --- backward: dQ over row lists --------------------------------------------


def _dq_kernel(fc_ref, fi_ref, pc_ref, pi_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, cfg, nq, sk):
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, i = _program_ids(nq)
  ragged = cfg.kv_len % bk != 0
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  dq = jnp.zeros(q.shape, jnp.float32)
  prec = block_math.dot_precision(q.dtype)
  for cnt_ref, idx_ref, fn in _row_lists(fc_ref, fi_ref, pc_ref, pi_ref, cfg):

    def body(start, acc, fn=fn):
      k = k_ref[pl.ds(start, sk), :]
      vis = block_math.element_mask(fn, b, h, i * bq, start, bq, sk,
                                    cfg.kv_len, ragged)
      _, ds = block_math.probs_and_dscores(q, k, v_ref[pl.ds(start, sk), :],
                                           do, lse, delta, cfg.scale,
                                           cfg.soft_cap, vis)
      return acc + jax.lax.dot(ds.astype(k.dtype), k, precision=prec,
                               preferred_element_type=jnp.float32)

    dq = _walk(cnt_ref, idx_ref, bk, sk, body, dq)
  dq_ref[...] = dq.astype(dq_ref.dtype)


# --- backward: dK/dV over column lists --------------------------------------


def _dkv_kernel(fc_ref, fi_ref, pc_ref, pi_ref, k_ref, v_ref, q_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, cfg, sq):
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, j = _program_ids(None)
  ragged = cfg.kv_len % bk != 0
  k, v = k_ref[...], v_ref[...]
  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  prec = block_math.dot_precision(k.dtype)
  for cnt_ref, idx_ref, fn in _row_lists(fc_ref, fi_ref, pc_ref, pi_ref, cfg):

    def body(qs, c, fn=fn):
      q = q_ref[pl.ds(qs, sq), :]
      do = do_ref[pl.ds(qs, sq), :]
      vis = block_math.element_mask(fn, b, h, qs, j * bk, sq, bk, cfg.kv_len,
                                    ragged)
      p, ds = block_math.probs_and_dscores(
          q, k, v, do, lse_ref[pl.ds(qs, sq)], delta_ref[pl.ds(qs, sq)],
          cfg.scale, cfg.soft_cap, vis)
      dk = c[0] + jax.lax.dot_general(
          ds.astype(q.dtype), q, (((0,), (0,)), ((), ())), precision=prec,
          preferred_element_type=jnp.float32)
      dv = c[1] + jax.lax.dot_general(
          p.astype(do.dtype), do, (((0,), (0,)), ((), ())), precision=prec,
          preferred_element_type=jnp.float32)
      return dk, dv

    carry = _walk(cnt_ref, idx_ref, bq, sq, body, carry)
  dk_ref[...] = carry[0].astype(dk_ref.dtype)
  dv_ref[...] = carry[1].astype(dv_ref.dtype)


def backward(q, k, v, out, lse, do, delta, lists, cfg):
  del out
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  group = h // hkv
  bq, bk = cfg.block_q, cfg.block_kv
  nq, nk = lq // bq, lk // bk
  validate_blocks(bq, bk, d)
  tuning = cfg.tuning or TuningConfig()
  params = pltriton.CompilerParams(num_warps=tuning.warps("bwd", d),
                                   num_stages=tuning.num_stages_bwd)
  do = do.astype(q.dtype)

  fi, pi = lists["full_idx"], lists["partial_idx"]
  row = lambda i, hh, bb: (bb, hh, nq - 1 - i)
  q_blk = pl.BlockSpec((None, bq, None, d),
                       lambda i, hh, bb: (bb, nq - 1 - i, hh, 0))
  kv_all = pl.BlockSpec((None, lk, None, d),
                        lambda i, hh, bb: (bb, 0, hh // group, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, nq=nq,
                        sk=tuning.sub("sub_kv_dq", bk)),
      grid=(nq, h, b),
      in_specs=_list_specs(fi.shape[-1], pi.shape[-1], row) + [
          q_blk, kv_all, kv_all, q_blk,
          pl.BlockSpec((None, None, bq), row),
          pl.BlockSpec((None, None, bq), row)],
      out_specs=q_blk,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=cfg.interpret,
      name="sparsejax_block_sparse_dq",
  )(lists["full_counts"], fi, lists["partial_counts"], pi, q, k, v, do, lse,
    delta)

  fit, pit = lists["full_idx_t"], lists["partial_idx_t"]
  col = lambda j, hh, bb: (bb, hh, j)
  kv_blk = pl.BlockSpec((None, bk, None, d),
                        lambda j, hh, bb: (bb, j, hh // group, 0))
  q_all = pl.BlockSpec((None, lq, None, d), lambda j, hh, bb: (bb, 0, hh, 0))
  row_all = pl.BlockSpec((None, None, lq), lambda j, hh, bb: (bb, hh, 0))
  dkv_dtype = k.dtype if group == 1 else jnp.float32
  out_blk = pl.BlockSpec((None, bk, None, d), lambda j, hh, bb: (bb, j, hh, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg,
                        sq=tuning.sub("sub_q_dkv", bq)),
      grid=(nk, h, b),
      in_specs=_list_specs(fit.shape[-1], pit.shape[-1], col) + [
          kv_blk, kv_blk, q_all, q_all, row_all, row_all],
      out_specs=[out_blk, out_blk],
      out_shape=[jax.ShapeDtypeStruct((b, lk, h, d), dkv_dtype)] * 2,
      compiler_params=params, interpret=cfg.interpret,
      name="sparsejax_block_sparse_dkv",
  )(lists["full_counts_t"], fit, lists["partial_counts_t"], pit, k, v, q, do,
    lse, delta)
  if group > 1:  # sum the q heads of each kv head
    dk = dk.reshape(b, lk, hkv, group, d).sum(3).astype(k.dtype)
    dv = dv.reshape(b, lk, hkv, group, d).sum(3).astype(v.dtype)
  return dq, dk, dv


_attention = make_vjp(forward, backward)


def attention(q, k, v, lists, cfg):
  """custom_vjp attention; index lists are padded to power-of-two widths
  (Triton block shapes) once, here, for the forward and both backward
  kernels."""
  lists = {f: _pad_width(x) if "_idx" in f else x for f, x in lists.items()}
  return _attention(q, k, v, lists, cfg)
