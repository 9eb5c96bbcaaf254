"""Scatterbrain attention for GPU: Pallas with the Triton lowering.

The fused block-sparse pass of `sparsejax.lowrank`: forward and dQ programs
own one (q block, head, batch), seed their accumulators with the row's
low-rank terms (q_hat against the pre-pass states sum k_hat v^T, sum k_hat,
plus, when causal, the block's own keys j <= i) and walk the row's full then
partial kv-block lists, where each entry gets e^s - u 2^pls2 instead of e^s
(u = q_hat k_hat^T, a second small matmul on the feature tiles). dK/dV
programs own one (kv block, q head, batch), seeded from the query states,
and walk the transposed lists. The arithmetic is sparsejax.lowrank.sb_math
(shared with impl="xla"); lists are ordinary inputs read in the kernel (the
GPU backends have no scalar prefetch). GQA: dK/dV per q head, summed per kv
head outside.

`attention` (bottom) is the custom_vjp entry used by
sparsejax.lowrank.scatterbrain_attention;
`sparsejax.lowrank.reference.scatterbrain_reference` is the definition it
must match.
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
from sparsejax.lowrank import sb_math
from sparsejax.lowrank import vjp


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Warps, stages and sub-tiles; the list blocks come from the BlockMask.

  The forward walks each kv block in `sub_kv_fwd` columns, dQ in
  `sub_kv_dq` columns and dK/dV each q block in `sub_q_dkv` rows (None:
  the whole block forward, 32 in the backward), as the core kernel does.
  """
  num_warps_fwd: Optional[int] = None  # 4 for head_dim <= 64, else 8
  num_warps_bwd: Optional[int] = None
  num_stages_fwd: int = 2
  num_stages_bwd: int = 2
  sub_kv_fwd: Optional[int] = None
  sub_kv_dq: Optional[int] = None
  sub_q_dkv: Optional[int] = None

  def __post_init__(self):
    for name in ("num_warps_fwd", "num_warps_bwd"):
      w = getattr(self, name)
      if w is not None and (w < 1 or w & (w - 1) or w > 16):
        raise ValueError(f"{name} must be a power of two in [1, 16], got {w}")
    for name in ("num_stages_fwd", "num_stages_bwd"):
      if not 1 <= getattr(self, name) <= 8:
        raise ValueError(f"{name} must be in [1, 8], got "
                         f"{getattr(self, name)}")
    for name in ("sub_kv_fwd", "sub_kv_dq", "sub_q_dkv"):
      v = getattr(self, name)
      if v is not None and (v < 16 or v & (v - 1)):
        raise ValueError(f"{name} must be a power of two >= 16, got {v}")

  def sub(self, name: str, block: int) -> int:
    v = getattr(self, name)
    if v is None:
      v = block if name == "sub_kv_fwd" else min(block, 32)
    if block % v:
      raise ValueError(f"{name} ({v}) must divide the block ({block})")
    return v

  def warps(self, which: str, head_dim: int) -> int:
    w = getattr(self, f"num_warps_{which}")
    return w if w is not None else (4 if head_dim <= 64 else 8)


def unsupported(dtype, head_dim, block_q, block_kv, num_features, causal,
                interpret=False):
  """Why this kernel cannot run a problem (None if it can)."""
  del dtype, causal, interpret
  if num_features > 256:
    return f"needs at most 256 features, got {num_features}"
  if head_dim > 128 and max(block_q, block_kv) > 64:
    # The feature tiles and states add to the core kernel's shared memory,
    # which already needs 64-wide tiles at head_dim 256.
    return (f"head_dim {head_dim} needs mask blocks <= 64 (shared memory), "
            f"got ({block_q}, {block_kv})")
  return None


def _tuning(cfg) -> TuningConfig:
  if cfg.tuning is None:
    return TuningConfig()
  if not isinstance(cfg.tuning, TuningConfig):
    raise ValueError(f"tuning for impl='pallas_triton' must be a "
                     f"pallas_kernels.gpu.scatterbrain_attention.TuningConfig,"
                     f" got {type(cfg.tuning).__name__}")
  return cfg.tuning


def _check(q, qf, cfg):
  reason = unsupported(q.dtype, q.shape[-1], cfg.block_q, cfg.block_kv,
                       cfg.num_features, cfg.causal)
  if reason is not None:
    raise ValueError(f"pallas_triton: {reason}")
  for name, n in (("head_dim", q.shape[-1]), ("feature columns",
                                               qf.shape[-1])):
    if n < 16 or n & (n - 1):
      raise ValueError(f"pallas_triton needs {name} padded to a power of two"
                       f" >= 16, got {n}")


def _row_lists(fc_ref, fi_ref, pc_ref, pi_ref, cfg):
  out = [(fc_ref, fi_ref, None)]
  if cfg.mask_fn is not None:
    out.append((pc_ref, pi_ref, cfg.mask_fn))
  return out


def _walk(cnt_ref, idx_ref, block, sub, body, carry):
  """body(start, carry) over every `sub`-sized tile of the listed blocks, as
  one flat loop over (entry, sub-tile) so Triton can pipeline the loads."""
  nsub = block // sub
  shift = nsub.bit_length() - 1

  def step(t, c):
    entry, part = jnp.right_shift(t, shift), jnp.bitwise_and(t, nsub - 1)
    return body(pl.multiple_of(idx_ref[entry] * block + part * sub, sub), c)

  return jax.lax.fori_loop(0, cnt_ref[...] * nsub, step, carry)


def _list_specs(width_f, width_p, index):
  cnt = pl.BlockSpec((None, None, None), index)
  return [cnt, pl.BlockSpec((None, None, None, width_f),
                            lambda *g: index(*g) + (0,)),
          cnt, pl.BlockSpec((None, None, None, width_p),
                            lambda *g: index(*g) + (0,))]


def _pad_width(idx):
  w = next_power_of_2(idx.shape[-1])
  return jnp.pad(idx, [(0, 0)] * (idx.ndim - 1) + [(0, w - idx.shape[-1])],
                 mode="edge")


class _Specs:
  """BlockSpecs on a (block, head, batch) grid; `rev` walks blocks last to
  first (causal rows are heaviest last: better tail balance)."""

  def __init__(self, n, group, causal, rev):
    self.n, self.group, self.causal, self.rev = n, group, causal, rev

  def blk(self, i):
    return self.n - 1 - i if self.rev else i

  def tile(self, rows, width, kv_head=False):
    g = self.group if kv_head else 1
    return pl.BlockSpec((None, rows, None, width),
                        lambda i, h, b: (b, self.blk(i), h // g, 0))

  def whole(self, length, width, kv_head=False):
    g = self.group if kv_head else 1
    return pl.BlockSpec((None, length, None, width),
                        lambda i, h, b: (b, 0, h // g, 0))

  def vec(self, rows):
    return pl.BlockSpec((None, None, rows), lambda i, h, b: (b, h,
                                                             self.blk(i)))

  def vec_whole(self, length):
    return pl.BlockSpec((None, None, length), lambda i, h, b: (b, h, 0))

  def state(self, shape, kv_head):
    g = self.group if kv_head else 1
    return pl.BlockSpec((None, None, None) + shape, lambda i, h, b: (
        b, h // g, self.blk(i) if self.causal else 0) + (0,) * len(shape))

  def lists(self, lists, suffix):
    fi, pi = lists["full_idx" + suffix], lists["partial_idx" + suffix]
    row = lambda i, h, b: (b, h, self.blk(i))
    return _list_specs(fi.shape[-1], pi.shape[-1], row), (
        lists["full_counts" + suffix], fi, lists["partial_counts" + suffix],
        pi)

  def block(self):
    i, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    return b, h, self.blk(i)


# --- forward ----------------------------------------------------------------


def _fwd_kernel(fc_ref, fi_ref, pc_ref, pi_ref, q_ref, k_ref, v_ref, qf_ref,
                kf_ref, pls_ref, hs_ref, zs_ref, o_ref, lse_ref, kappa_ref, *,
                cfg, specs, sk):
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, i = specs.block()
  ragged = cfg.kv_len % bk != 0
  q, qf, pls2 = q_ref[...], qf_ref[...], pls_ref[...]
  own = {}
  if cfg.causal:  # the block's own keys j <= i
    own = dict(kf_c=kf_ref[pl.ds(i * bq, bq), :],
               v_c=v_ref[pl.ds(i * bq, bq), :])
  acc, lc = sb_math.seed_forward(qf, hs_ref[...], zs_ref[...], **own)
  carry = sb_math.init_carry(pls2, acc, lc)
  for cnt_ref, idx_ref, fn in _row_lists(fc_ref, fi_ref, pc_ref, pi_ref, cfg):

    def body(start, c, fn=fn):
      s = block_math.scores(q, k_ref[pl.ds(start, sk), :], cfg.scale, None)
      u = sb_math.dot(qf, kf_ref[pl.ds(start, sk), :], trans_b=True)
      vis = block_math.element_mask(fn, b, h, i * bq, start, bq, sk,
                                    cfg.kv_len, ragged)
      return sb_math.step(s, u, v_ref[pl.ds(start, sk), :], pls2, c, vis)

    carry = _walk(cnt_ref, idx_ref, bk, sk, body, carry)
  out, lse, kappa = sb_math.finalize(pls2, carry, o_ref.dtype)
  o_ref[...] = out
  lse_ref[...] = lse
  kappa_ref[...] = kappa


def forward(q, k, v, qf, kf, pls2, hs, zs, lists, cfg):
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  mf = qf.shape[-1]
  bq = cfg.block_q
  nq = lq // bq
  _check(q, qf, cfg)
  tuning = _tuning(cfg)
  sp = _Specs(nq, h // hkv, cfg.causal, rev=True)
  list_specs, list_args = sp.lists(lists, "")
  vec = jax.ShapeDtypeStruct((b, h, lq), jnp.float32)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, specs=sp,
                        sk=tuning.sub("sub_kv_fwd", cfg.block_kv)),
      grid=(nq, h, b),
      in_specs=list_specs + [
          sp.tile(bq, d), sp.whole(lk, d, True), sp.whole(lk, d, True),
          sp.tile(bq, mf), sp.whole(lk, mf, True), sp.vec(bq),
          sp.state((mf, d), True), sp.state((mf,), True)],
      out_specs=[sp.tile(bq, d), sp.vec(bq), sp.vec(bq)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), vec, vec],
      compiler_params=pltriton.CompilerParams(
          num_warps=tuning.warps("fwd", d), num_stages=tuning.num_stages_fwd),
      interpret=cfg.interpret,
      name="sparsejax_scatterbrain_fwd",
  )(*list_args, q, k, v, qf, kf, pls2, hs, zs)


# --- backward: dQ and dq_hat over row lists ---------------------------------


def _dq_kernel(fc_ref, fi_ref, pc_ref, pi_ref, q_ref, k_ref, v_ref, qf_ref,
               kf_ref, do_ref, lse_ref, delta_ref, beta_ref, kd_ref, hs_ref,
               zs_ref, dq_ref, dqf_ref, *, cfg, specs, sk):
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, i = specs.block()
  ragged = cfg.kv_len % bk != 0
  q, qf, do = q_ref[...], qf_ref[...], do_ref[...]
  rows = (lse_ref[...], delta_ref[...], beta_ref[...], kd_ref[...])
  own = {}
  if cfg.causal:
    own = dict(kf_c=kf_ref[pl.ds(i * bq, bq), :],
               v_c=v_ref[pl.ds(i * bq, bq), :])
  dqf = sb_math.seed_dq(do, rows[2], rows[3], hs_ref[...], zs_ref[...],
                        **own)
  dq = jnp.zeros(q.shape, jnp.float32)
  for cnt_ref, idx_ref, fn in _row_lists(fc_ref, fi_ref, pc_ref, pi_ref, cfg):

    def body(start, c, fn=fn):
      k, kf = k_ref[pl.ds(start, sk), :], kf_ref[pl.ds(start, sk), :]
      vis = block_math.element_mask(fn, b, h, i * bq, start, bq, sk,
                                    cfg.kv_len, ragged)
      ds, r, _ = sb_math.block_grads(q, k, v_ref[pl.ds(start, sk), :], do,
                                     qf, kf, *rows, cfg.scale, vis)
      return (c[0] + sb_math.dot(ds.astype(k.dtype), k),
              c[1] - sb_math.dot(r.astype(kf.dtype), kf))

    dq, dqf = _walk(cnt_ref, idx_ref, bk, sk, body, (dq, dqf))
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dqf_ref[...] = dqf


# --- backward: dK, dV and dk_hat over column lists --------------------------


def _dkv_kernel(fc_ref, fi_ref, pc_ref, pi_ref, k_ref, v_ref, kf_ref, q_ref,
                qf_ref, do_ref, lse_ref, delta_ref, beta_ref, kd_ref, gs_ref,
                ys_ref, dk_ref, dv_ref, dkf_ref, *, cfg, specs, sq):
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, j = specs.block()
  ragged = cfg.kv_len % bk != 0
  k, v, kf = k_ref[...], v_ref[...], kf_ref[...]
  own = {}
  if cfg.causal:  # the block's own queries i >= j
    at = pl.ds(j * bk, bk)
    own = dict(qf_c=qf_ref[at, :], do_c=do_ref[at, :], beta_c=beta_ref[at],
               kd_c=kd_ref[at])
  dkf, dv = sb_math.seed_dkv(kf, v, gs_ref[...], ys_ref[...], **own)
  carry = (jnp.zeros(k.shape, jnp.float32), dv, dkf)
  for cnt_ref, idx_ref, fn in _row_lists(fc_ref, fi_ref, pc_ref, pi_ref, cfg):

    def body(qs, c, fn=fn):
      at = pl.ds(qs, sq)
      q, qf, do = q_ref[at, :], qf_ref[at, :], do_ref[at, :]
      vis = block_math.element_mask(fn, b, h, qs, j * bk, sq, bk, cfg.kv_len,
                                    ragged)
      ds, r, pv = sb_math.block_grads(
          q, k, v, do, qf, kf, lse_ref[at], delta_ref[at], beta_ref[at],
          kd_ref[at], cfg.scale, vis)
      return (c[0] + sb_math.dot(ds.astype(q.dtype), q, trans_a=True),
              c[1] + sb_math.dot(pv.astype(do.dtype), do, trans_a=True),
              c[2] - sb_math.dot(r.astype(qf.dtype), qf, trans_a=True))

    carry = _walk(cnt_ref, idx_ref, bq, sq, body, carry)
  dk_ref[...] = carry[0].astype(dk_ref.dtype)
  dv_ref[...] = carry[1].astype(dv_ref.dtype)
  dkf_ref[...] = carry[2]


def backward(q, k, v, qf, kf, do, lse, delta, beta, kd, hs, zs, gs, ys,
             lists, cfg):
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  mf = qf.shape[-1]
  group = h // hkv
  bq, bk = cfg.block_q, cfg.block_kv
  nq, nk = lq // bq, lk // bk
  _check(q, qf, cfg)
  tuning = _tuning(cfg)
  params = pltriton.CompilerParams(num_warps=tuning.warps("bwd", d),
                                   num_stages=tuning.num_stages_bwd)
  do = do.astype(q.dtype)

  sp = _Specs(nq, group, cfg.causal, rev=True)
  list_specs, list_args = sp.lists(lists, "")
  dq, dqf = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, specs=sp,
                        sk=tuning.sub("sub_kv_dq", bk)),
      grid=(nq, h, b),
      in_specs=list_specs + [
          sp.tile(bq, d), sp.whole(lk, d, True), sp.whole(lk, d, True),
          sp.tile(bq, mf), sp.whole(lk, mf, True), sp.tile(bq, d)]
      + [sp.vec(bq)] * 4 + [sp.state((mf, d), True), sp.state((mf,), True)],
      out_specs=[sp.tile(bq, d), sp.tile(bq, mf)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, lq, h, mf), jnp.float32)],
      compiler_params=params, interpret=cfg.interpret,
      name="sparsejax_scatterbrain_dq",
  )(*list_args, q, k, v, qf, kf, do, lse, delta, beta, kd, hs, zs)

  sp = _Specs(nk, group, cfg.causal, rev=False)
  list_specs, list_args = sp.lists(lists, "_t")
  dtype = lambda x: x.dtype if group == 1 else jnp.float32
  dk, dv, dkf = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, specs=sp,
                        sq=tuning.sub("sub_q_dkv", bq)),
      grid=(nk, h, b),
      in_specs=list_specs + [
          sp.tile(bk, d, True), sp.tile(bk, d, True), sp.tile(bk, mf, True),
          sp.whole(lq, d), sp.whole(lq, mf), sp.whole(lq, d)]
      + [sp.vec_whole(lq)] * 4 + [sp.state((mf, d), False),
                                  sp.state((mf,), False)],
      out_specs=[sp.tile(bk, d), sp.tile(bk, d), sp.tile(bk, mf)],
      out_shape=[jax.ShapeDtypeStruct((b, lk, h, d), dtype(k)),
                 jax.ShapeDtypeStruct((b, lk, h, d), dtype(v)),
                 jax.ShapeDtypeStruct((b, lk, h, mf), jnp.float32)],
      compiler_params=params, interpret=cfg.interpret,
      name="sparsejax_scatterbrain_dkv",
  )(*list_args, k, v, kf, q, qf, do, lse, delta, beta, kd, gs, ys)
  if group > 1:  # sum the q heads of each kv head
    per_kv = lambda x: x.reshape(b, lk, hkv, group, x.shape[-1]).sum(3)
    dk, dv, dkf = (per_kv(dk).astype(k.dtype), per_kv(dv).astype(v.dtype),
                   per_kv(dkf))
  return dq, dk, dv, dqf, dkf


_attention = vjp.make_op(forward, backward)


def attention(q, k, v, projection, lists, cfg):
  """custom_vjp Scatterbrain; index lists padded to power-of-two widths
  (Triton block shapes) once, here, for the forward and both backward
  kernels."""
  lists = {f: _pad_width(x) if "_idx" in f else x for f, x in lists.items()}
  return _attention(q, k, v, projection, lists, cfg)
