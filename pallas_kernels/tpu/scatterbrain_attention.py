"""Scatterbrain attention for TPU: Pallas with the Mosaic lowering.

The fused block-sparse pass of `sparsejax.lowrank` on a scalar-prefetch
grid (batch, head, block row, list step): the step table (one concatenated
full-then-partial list per row, (block << 2) | kind as in the core TPU
kernel) is read by the index_maps, so the pipeline DMAs only listed tiles.
At step 0 a row seeds its VMEM accumulators with its low-rank terms (q_hat
against the pre-pass states, plus its own chunk's keys when causal), each
listed step adds e^s - u 2^pls2 (sparsejax.lowrank.sb_math, shared with
impl="xla" and the Triton kernel), and the last step writes the row. dK/dV
rows are kv blocks over the transposed lists, seeded from the query states.

Layout as the core TPU kernel: q/k/v/features stay [B, L, H, .] viewed as
[B, L, H * .] (head_dim zero-padded to a multiple of 128 on hardware, the
features by the pre-pass); per-row vectors travel as [B, H, L, 1] columns.
The whole step table sits in SMEM (B * H * rows * steps int32), so very
long masks need the core kernel's chunking (not done here: a ValueError
names the limit). GQA: dK/dV per q head, summed per kv head outside.

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
from jax.experimental.pallas import tpu as pltpu

from sparsejax.block_sparse import block_math
from sparsejax.lowrank import sb_math
from sparsejax.lowrank import vjp

NUM_LANES = 128
_SKIP, _FULL, _PARTIAL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Compiler settings; the block sizes come from the BlockMask."""
  vmem_limit_bytes: Optional[int] = None
  smem_table_bytes: int = 512 * 1024  # the step table must fit SMEM

  def __post_init__(self):
    if self.vmem_limit_bytes is not None and (
        not isinstance(self.vmem_limit_bytes, int)
        or self.vmem_limit_bytes < (1 << 20)):
      raise ValueError(f"vmem_limit_bytes must be None or an int >= 1 MiB, "
                       f"got {self.vmem_limit_bytes!r}")
    if not isinstance(self.smem_table_bytes, int) or not (
        4 <= self.smem_table_bytes <= (1 << 20)):
      raise ValueError(f"smem_table_bytes must be an int in [4, 1 MiB], got "
                       f"{self.smem_table_bytes!r}")


def unsupported(dtype, head_dim, block_q, block_kv, num_features, causal,
                interpret=False):
  """Why this kernel cannot run a problem (None if it can). Interpret mode
  has no tiling constraints (the tests' small blocks run there)."""
  del dtype, head_dim, num_features, causal
  if not interpret and (block_q % 8 or block_kv % NUM_LANES):
    return (f"needs block_q % 8 == 0 and block_kv % 128 == 0 (TPU tiling), "
            f"got ({block_q}, {block_kv})")
  return None


def _tuning(cfg) -> TuningConfig:
  if cfg.tuning is None:
    return TuningConfig()
  if not isinstance(cfg.tuning, TuningConfig):
    raise ValueError(f"tuning for impl='pallas_tpu' must be a pallas_kernels."
                     f"tpu.scatterbrain_attention.TuningConfig, got "
                     f"{type(cfg.tuning).__name__}")
  return cfg.tuning


def _interpret(flag):
  if not flag:
    return False
  if isinstance(flag, pltpu.InterpretParams):
    return flag
  return pltpu.InterpretParams(detect_races=True)


def _step_table(lists, suffix, cfg):
  """int32 [B, H, R, S] of (block << 2) | kind; steps past a section's count
  are _SKIP and name a resident block (no DMA), as in the core kernel."""
  fc, fi = lists["full_counts" + suffix][..., None], lists["full_idx" + suffix]
  kind = jnp.where(jnp.arange(fi.shape[-1]) < fc, _FULL, _SKIP)
  if cfg.mask_fn is None:
    return fi * 4 + kind
  pc = lists["partial_counts" + suffix][..., None]
  pi = lists["partial_idx" + suffix]
  block = jnp.concatenate([jnp.where(fc > 0, fi, pi[..., :1]),
                           jnp.where(pc > 0, pi, fi[..., -1:])], -1)
  kind = jnp.concatenate(
      [kind, jnp.where(jnp.arange(pi.shape[-1]) < pc, _PARTIAL, _SKIP)], -1)
  return block * 4 + kind


def _run_step(table_ref, cfg, body):
  b, h, r, s = (pl.program_id(a) for a in range(4))
  entry = table_ref[b, h, r, s]
  kind, block = jnp.bitwise_and(entry, 3), jnp.right_shift(entry, 2)
  pl.when(kind == _FULL)(lambda: body(block, None))
  if cfg.mask_fn is not None:
    pl.when(kind == _PARTIAL)(lambda: body(block, cfg.mask_fn))


def _col(ref):
  return ref[...][:, 0]


class _Geometry:
  """Views, padded head dim and the BlockSpecs shared by the three kernels.

  Tiles sit at the grid row's own block ("row") or at the block the list
  step names ("listed").
  """

  def __init__(self, q, k, qf, cfg):
    self.b, self.lq, self.h, self.d = q.shape
    self.group = self.h // k.shape[2]
    self.mf = qf.shape[-1]
    self.interpret = _interpret(cfg.interpret)
    self.dp = self.d if self.interpret else -(-self.d // NUM_LANES) * NUM_LANES
    if not self.interpret:
      reason = unsupported(q.dtype, self.d, cfg.block_q, cfg.block_kv,
                           self.mf, cfg.causal)
      if reason is not None:
        raise ValueError(f"pallas_tpu: {reason}")
    self.causal = cfg.causal
    self.tuning = _tuning(cfg)

  def view(self, x, width=None):
    """[B, L, Hx, w] -> [B, L, Hx * width] (zero-padding w)."""
    width = width or self.dp
    if x.shape[-1] != width:
      x = jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])
    return x.reshape(*x.shape[:2], -1)

  def unview(self, x, heads, width):
    return x.reshape(*x.shape[:2], heads, -1)[..., :width]

  @staticmethod
  def _pick(which):
    if which == "row":
      return lambda r, t: r
    return lambda r, t: jnp.right_shift(t, 2)

  def tile(self, rows, width, which, kv_head):
    pick, g = self._pick(which), self.group if kv_head else 1
    return pl.BlockSpec((None, rows, width), lambda b, h, r, s, t: (
        b, pick(r, t[b, h, r, s]), h // g))

  def col(self, rows, which):
    pick = self._pick(which)
    return pl.BlockSpec((None, None, rows, 1), lambda b, h, r, s, t: (
        b, h, pick(r, t[b, h, r, s]), 0))

  def state(self, shape, kv_head):
    g = self.group if kv_head else 1
    return pl.BlockSpec((None, None, None) + shape, lambda b, h, r, s, t: (
        b, h // g, r if self.causal else 0, 0, 0))

  def call(self, kernel, table, args, in_specs, out_specs, out_shape,
           scratch, name):
    if table.size * 4 > self.tuning.smem_table_bytes:
      raise ValueError(f"pallas_tpu: the step table ({table.size * 4} bytes)"
                       f" exceeds smem_table_bytes="
                       f"{self.tuning.smem_table_bytes}")
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=table.shape, in_specs=in_specs,
            out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel",
                                 "arbitrary"),
            vmem_limit_bytes=self.tuning.vmem_limit_bytes),
        interpret=self.interpret, name=name)(table, *args)


def _first(s):
  return s == 0


def _last(s):
  return s == pl.num_programs(3) - 1


def _cols(x):
  return x[..., None]


def _zs(z):
  return z[..., None, :]  # [.., n, 1, m]: (1, m) tiles


# --- forward ----------------------------------------------------------------


def _fwd_kernel(table_ref, q_ref, k_ref, v_ref, qf_ref, kf_ref, pls_ref,
                hs_ref, zs_ref, *rest, cfg):
  own_refs, rest = (rest[:2], rest[2:]) if cfg.causal else ((), rest)
  o_ref, lse_ref, kappa_ref, m_ref, ls_ref, lc_ref, acc_ref = rest
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, i, s = (pl.program_id(a) for a in range(4))
  ragged = cfg.kv_len % bk != 0
  pls2 = _col(pls_ref)

  @pl.when(_first(s))
  def _seed():
    own = {}
    if cfg.causal:
      own = dict(kf_c=own_refs[0][...], v_c=own_refs[1][...])
    acc, lc = sb_math.seed_forward(qf_ref[...], hs_ref[...],
                                   zs_ref[...][0], **own)
    m_ref[...] = pls2[:, None]
    ls_ref[...] = jnp.zeros(ls_ref.shape, jnp.float32)
    lc_ref[...] = lc[:, None]
    acc_ref[...] = acc

  def body(kv_block, fn):
    s2 = block_math.scores(q_ref[...], k_ref[...], cfg.scale, None)
    u = sb_math.dot(qf_ref[...], kf_ref[...], trans_b=True)
    vis = block_math.element_mask(fn, b, h, i * bq, kv_block * bk, bq, bk,
                                  cfg.kv_len, ragged)
    m, ls, lc, acc = sb_math.step(
        s2, u, v_ref[...], pls2,
        (_col(m_ref), _col(ls_ref), _col(lc_ref), acc_ref[...]), vis)
    m_ref[...] = m[:, None]
    ls_ref[...] = ls[:, None]
    lc_ref[...] = lc[:, None]
    acc_ref[...] = acc

  _run_step(table_ref, cfg, body)

  @pl.when(_last(s))
  def _finish():
    out, lse, kappa = sb_math.finalize(
        pls2, (_col(m_ref), _col(ls_ref), _col(lc_ref), acc_ref[...]),
        o_ref.dtype)
    o_ref[...] = out
    lse_ref[...] = lse[:, None]
    kappa_ref[...] = kappa[:, None]


def forward(q, k, v, qf, kf, pls2, hs, zs, lists, cfg):
  g = _Geometry(q, k, qf, cfg)
  bq, bk, mf, dp = cfg.block_q, cfg.block_kv, g.mf, g.dp
  hs = jnp.pad(hs, [(0, 0)] * 4 + [(0, dp - g.d)])
  args = [g.view(q), g.view(k), g.view(v), g.view(qf, mf), g.view(kf, mf),
          _cols(pls2), hs, _zs(zs)]
  specs = [g.tile(bq, dp, "row", False), g.tile(bk, dp, "listed", True),
           g.tile(bk, dp, "listed", True), g.tile(bq, mf, "row", False),
           g.tile(bk, mf, "listed", True), g.col(bq, "row"),
           g.state((mf, dp), True), g.state((1, mf), True)]
  if cfg.causal:  # the row's own keys, at the q block's position
    args += [args[4], args[2]]
    specs += [g.tile(bq, mf, "row", True), g.tile(bq, dp, "row", True)]
  col = jax.ShapeDtypeStruct((g.b, g.h, g.lq, 1), jnp.float32)
  out, lse, kappa = g.call(
      functools.partial(_fwd_kernel, cfg=cfg), _step_table(lists, "", cfg),
      args, specs,
      [g.tile(bq, dp, "row", False), g.col(bq, "row"), g.col(bq, "row")],
      [jax.ShapeDtypeStruct((g.b, g.lq, g.h * dp), q.dtype), col, col],
      [pltpu.VMEM((bq, 1), jnp.float32)] * 3
      + [pltpu.VMEM((bq, dp), jnp.float32)], "sparsejax_scatterbrain_fwd_tpu")
  return g.unview(out, g.h, g.d), lse[..., 0], kappa[..., 0]


# --- backward: dQ and dq_hat over row lists ---------------------------------


def _dq_kernel(table_ref, q_ref, k_ref, v_ref, qf_ref, kf_ref, do_ref,
               lse_ref, delta_ref, beta_ref, kd_ref, hs_ref, zs_ref, *rest,
               cfg):
  own_refs, rest = (rest[:2], rest[2:]) if cfg.causal else ((), rest)
  dq_ref, dqf_ref, dq_acc, dqf_acc = rest
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, i, s = (pl.program_id(a) for a in range(4))
  ragged = cfg.kv_len % bk != 0
  rows = [_col(r) for r in (lse_ref, delta_ref, beta_ref, kd_ref)]

  @pl.when(_first(s))
  def _seed():
    own = {}
    if cfg.causal:
      own = dict(kf_c=own_refs[0][...], v_c=own_refs[1][...])
    dqf_acc[...] = sb_math.seed_dq(do_ref[...], rows[2], rows[3],
                                   hs_ref[...], zs_ref[...][0], **own)
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

  def body(kv_block, fn):
    k, kf = k_ref[...], kf_ref[...]
    vis = block_math.element_mask(fn, b, h, i * bq, kv_block * bk, bq, bk,
                                  cfg.kv_len, ragged)
    ds, r, _ = sb_math.block_grads(q_ref[...], k, v_ref[...], do_ref[...],
                                   qf_ref[...], kf, *rows, cfg.scale, vis)
    dq_acc[...] += sb_math.dot(ds.astype(k.dtype), k)
    dqf_acc[...] -= sb_math.dot(r.astype(kf.dtype), kf)

  _run_step(table_ref, cfg, body)

  @pl.when(_last(s))
  def _finish():
    dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)
    dqf_ref[...] = dqf_acc[...]


# --- backward: dK, dV and dk_hat over column lists --------------------------


def _dkv_kernel(table_ref, k_ref, v_ref, kf_ref, q_ref, qf_ref, do_ref,
                lse_ref, delta_ref, beta_ref, kd_ref, gs_ref, ys_ref, *rest,
                cfg):
  own_refs, rest = (rest[:4], rest[4:]) if cfg.causal else ((), rest)
  dk_ref, dv_ref, dkf_ref, dk_acc, dv_acc, dkf_acc = rest
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, j, s = (pl.program_id(a) for a in range(4))
  ragged = cfg.kv_len % bk != 0

  @pl.when(_first(s))
  def _seed():
    own = {}
    if cfg.causal:
      own = dict(qf_c=own_refs[0][...], do_c=own_refs[1][...],
                 beta_c=_col(own_refs[2]), kd_c=_col(own_refs[3]))
    dkf, dv = sb_math.seed_dkv(kf_ref[...], v_ref[...], gs_ref[...],
                               ys_ref[...][0], **own)
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = dv
    dkf_acc[...] = dkf

  def body(q_block, fn):
    q, qf, do = q_ref[...], qf_ref[...], do_ref[...]
    vis = block_math.element_mask(fn, b, h, q_block * bq, j * bk, bq, bk,
                                  cfg.kv_len, ragged)
    ds, r, pv = sb_math.block_grads(
        q, k_ref[...], v_ref[...], do, qf, kf_ref[...],
        *(_col(x) for x in (lse_ref, delta_ref, beta_ref, kd_ref)),
        cfg.scale, vis)
    dk_acc[...] += sb_math.dot(ds.astype(q.dtype), q, trans_a=True)
    dv_acc[...] += sb_math.dot(pv.astype(do.dtype), do, trans_a=True)
    dkf_acc[...] -= sb_math.dot(r.astype(qf.dtype), qf, trans_a=True)

  _run_step(table_ref, cfg, body)

  @pl.when(_last(s))
  def _finish():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)
    dkf_ref[...] = dkf_acc[...]


def backward(q, k, v, qf, kf, do, lse, delta, beta, kd, hs, zs, gs, ys,
             lists, cfg):
  g = _Geometry(q, k, qf, cfg)
  bq, bk, mf, dp = cfg.block_q, cfg.block_kv, g.mf, g.dp
  lk, hkv = k.shape[1], k.shape[2]
  pad_d = lambda x: jnp.pad(x, [(0, 0)] * 4 + [(0, dp - g.d)])
  qv, kv_, vv = g.view(q), g.view(k), g.view(v)
  qfv, kfv = g.view(qf, mf), g.view(kf, mf)
  dov = g.view(do.astype(q.dtype))
  cols = [_cols(x) for x in (lse, delta, beta, kd)]

  args = [qv, kv_, vv, qfv, kfv, dov, *cols, pad_d(hs), _zs(zs)]
  specs = ([g.tile(bq, dp, "row", False), g.tile(bk, dp, "listed", True),
            g.tile(bk, dp, "listed", True), g.tile(bq, mf, "row", False),
            g.tile(bk, mf, "listed", True), g.tile(bq, dp, "row", False)]
           + [g.col(bq, "row")] * 4
           + [g.state((mf, dp), True), g.state((1, mf), True)])
  if cfg.causal:
    args += [kfv, vv]
    specs += [g.tile(bq, mf, "row", True), g.tile(bq, dp, "row", True)]
  dq, dqf = g.call(
      functools.partial(_dq_kernel, cfg=cfg), _step_table(lists, "", cfg),
      args, specs,
      [g.tile(bq, dp, "row", False), g.tile(bq, mf, "row", False)],
      [jax.ShapeDtypeStruct((g.b, g.lq, g.h * dp), q.dtype),
       jax.ShapeDtypeStruct((g.b, g.lq, g.h * mf), jnp.float32)],
      [pltpu.VMEM((bq, dp), jnp.float32), pltpu.VMEM((bq, mf), jnp.float32)],
      "sparsejax_scatterbrain_dq_tpu")

  args = [kv_, vv, kfv, qv, qfv, dov, *cols, pad_d(gs), _zs(ys)]
  specs = ([g.tile(bk, dp, "row", True), g.tile(bk, dp, "row", True),
            g.tile(bk, mf, "row", True), g.tile(bq, dp, "listed", False),
            g.tile(bq, mf, "listed", False), g.tile(bq, dp, "listed", False)]
           + [g.col(bq, "listed")] * 4
           + [g.state((mf, dp), False), g.state((1, mf), False)])
  if cfg.causal:  # the column's own queries, at the kv block's position
    args += [qfv, dov, cols[2], cols[3]]
    specs += [g.tile(bk, mf, "row", False), g.tile(bk, dp, "row", False),
              g.col(bk, "row"), g.col(bk, "row")]
  dtype = lambda x: x.dtype if g.group == 1 else jnp.float32
  dk, dv, dkf = g.call(
      functools.partial(_dkv_kernel, cfg=cfg), _step_table(lists, "_t", cfg),
      args, specs, [g.tile(bk, dp, "row", False)] * 2
      + [g.tile(bk, mf, "row", False)],
      [jax.ShapeDtypeStruct((g.b, lk, g.h * dp), dtype(k)),
       jax.ShapeDtypeStruct((g.b, lk, g.h * dp), dtype(v)),
       jax.ShapeDtypeStruct((g.b, lk, g.h * mf), jnp.float32)],
      [pltpu.VMEM((bk, dp), jnp.float32)] * 2
      + [pltpu.VMEM((bk, mf), jnp.float32)], "sparsejax_scatterbrain_dkv_tpu")
  dq, dqf = g.unview(dq, g.h, g.d), g.unview(dqf, g.h, mf)
  dk, dv, dkf = (g.unview(dk, g.h, g.d), g.unview(dv, g.h, g.d),
                 g.unview(dkf, g.h, mf))
  if g.group > 1:
    per_kv = lambda x: x.reshape(g.b, lk, hkv, g.group, x.shape[-1]).sum(3)
    dk, dv, dkf = (per_kv(dk).astype(k.dtype), per_kv(dv).astype(v.dtype),
                   per_kv(dkf))
  return dq, dk, dv, dqf, dkf


attention = vjp.make_op(forward, backward)
