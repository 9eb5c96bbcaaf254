"""Block-sparse flash attention for Hopper: Pallas with the Mosaic GPU lowering.

FlashAttention-3 structure (jax's ops/gpu/attention_mgpu.py) driven by the
BlockMask lists: each CTA owns `64 * compute_wgs` rows (q rows for the forward
and dQ, kv rows for dK/dV), one 64-row tile per compute warpgroup, and a
memory warpgroup walks that row's list, issuing TMA copies of the listed tiles
into a `max_concurrent_steps`-deep shared-memory ring. Compute warpgroups run
wgmma on the ring slots; full blocks take no element-mask work, partial blocks
(and every block when kv_len is ragged) are masked in registers. The full and
partial lists are merged into one step list per row outside the kernel, so
the memory warpgroup and the compute warpgroups agree on the walk by
construction: steps [0, n_full) are unmasked, [n_full, n_full + n_partial)
masked.

`attention` (bottom) is the custom_vjp entry used by sparsejax.attention;
`sparsejax.reference.attention_reference` is the definition it must match.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sparsejax.block_sparse import block_math
from sparsejax.block_sparse.vjp import make_vjp

ROWS = 64  # rows per compute warpgroup: the wgmma M dimension
_DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Tile sizes along the walked lists, ring depth and warpgroups per CTA.

  A mask block is walked in tiles: the forward splits each kv block into
  `tile_kv_fwd` columns, dQ into `tile_kv_dq` and dK/dV each q block into
  `tile_q_dkv` rows. None picks defaults that fit the H200's 227 KB of shared
  memory at the given head_dim.
  """
  tile_kv_fwd: Optional[int] = None  # 128, or 64 at head_dim 256
  tile_kv_dq: Optional[int] = None   # 128, or 64 at head_dim 256
  tile_q_dkv: Optional[int] = None   # 64
  max_concurrent_steps: int = 2
  compute_wgs_fwd: Optional[int] = None  # 2 (ping-pong) when the block allows
  compute_wgs_bwd: Optional[int] = None  # 2, or 1 at head_dim 256
  use_schedule_barrier: bool = True

  def __post_init__(self):
    if not 2 <= self.max_concurrent_steps <= 4:
      raise ValueError(f"max_concurrent_steps must be in [2, 4], got "
                       f"{self.max_concurrent_steps}")
    for name in ("compute_wgs_fwd", "compute_wgs_bwd"):
      if getattr(self, name) not in (None, 1, 2):
        raise ValueError(f"{name} must be 1 or 2, got {getattr(self, name)}")
    for name in ("tile_kv_fwd", "tile_kv_dq", "tile_q_dkv"):
      if getattr(self, name) not in (None, 64, 128):
        raise ValueError(f"{name} must be 64 or 128, got "
                         f"{getattr(self, name)}")

  def tile(self, name: str, head_dim: int, block: int) -> int:
    t = getattr(self, name)
    if t is None:  # from the sweep in benchmarks/attention/mosaic/NOTES.md
      t = 128 if name != "tile_q_dkv" and head_dim <= 128 else 64
      t = min(t, block)
    if block % t:
      raise ValueError(f"{name}={t} must divide the mask block ({block})")
    return t

  def wgs(self, which: str, head_dim: int, block: int) -> int:
    w = getattr(self, f"compute_wgs_{which}")
    if w is None:
      w = 1 if (which == "bwd" and head_dim > 128) else 2
      w = min(w, block // ROWS)
    if block % (ROWS * w):
      raise ValueError(f"compute_wgs_{which}={w} needs the mask block "
                       f"({block}) to be a multiple of {ROWS * w}")
    return w


def unsupported(dtype, head_dim: int, block_q: int, block_kv: int
               ) -> Optional[str]:
  """Why this kernel cannot run a problem, or None if it can."""
  if jnp.dtype(dtype) not in map(jnp.dtype, _DTYPES):
    return f"needs bfloat16 or float16 inputs (wgmma), got {jnp.dtype(dtype)}"
  if head_dim not in (64, 128, 256):
    return f"needs head_dim 64, 128 or 256, got {head_dim}"
  for name, b in (("block_q", block_q), ("block_kv", block_kv)):
    if b % ROWS or b > 256:
      return f"needs mask {name} a multiple of {ROWS} up to 256, got {b}"
  return None


# --- shared pieces -----------------------------------------------------------

_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _load_row_vector(ref, layout):
  """A [rows] f32 vector from SMEM in a wgmma row/column layout."""
  if _LOAD_TAKES_IDX:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


# jax 0.10 requires load's idx argument; 0.11 deprecates it.
_LOAD_TAKES_IDX = (inspect.signature(plgpu.load).parameters["idx"].default
                   is inspect.Parameter.empty)


def _tile_smem(n, rows, d, dtype):
  return plgpu.SMEM((n, rows, d), dtype, transforms=_TRANSFORMS)


@dataclasses.dataclass(frozen=True)
class _Walk:
  """One row's merged step list, read by every warpgroup of the CTA."""
  idx_ref: object  # [B, H, rows, width] int32: full entries, then partial
  nf_ref: object   # [B, H, rows] int32
  np_ref: object
  block: int       # mask block along the walked axis
  tile: int        # tile walked per step

  @property
  def nsub(self):
    return self.block // self.tile

  def counts(self, b, h, row):
    nf, npart = self.nf_ref[b, h, row], self.np_ref[b, h, row]
    return nf * self.nsub, (nf + npart) * self.nsub

  def start(self, b, h, row, t):
    sub = jnp.int32(self.nsub)
    entry, part = lax.div(t, sub), lax.rem(t, sub)
    return self.idx_ref[b, h, row, entry] * self.block + part * self.tile


def _visible(cfg, b, h, q_start, kv_start, shape, q_dim, masked):
  """Element mask of a tile in the wgmma register layout, or None.

  `q_dim` is the axis holding queries (1 for the transposed dK/dV tiles).
  """
  ragged = cfg.kv_len % cfg.block_kv != 0
  fn = cfg.mask_fn if masked else None
  if fn is None and not ragged:
    return None
  iota = functools.partial(plgpu.broadcasted_iota, jnp.int32, shape,
                           layout=plgpu.Layout.WGMMA)
  q_idx, kv_idx = q_start + iota(q_dim), kv_start + iota(1 - q_dim)
  vis = None if fn is None else fn(b, h, q_idx, kv_idx)
  if ragged:
    r = kv_idx < cfg.kv_len
    vis = r if vis is None else vis & r
  return vis


def _dscores(p, dp, delta, th, scale):
  """dL/d(raw q.k) from probabilities, dP and delta already broadcast."""
  ds = p * (dp - delta)
  if th is not None:  # soft-cap: d tanh
    ds = ds * (1.0 - th * th)
  return ds * scale


def _copy_in(copies, barrier):
  """Blocking TMA copies (src, dst), one after another on one barrier."""
  for src, dst in copies:
    plgpu.copy_gmem_to_smem(src, dst, barrier)
    plgpu.barrier_wait(barrier)


def _compute_registers(wgs):
  # The memory warpgroup gives up registers (40) to the compute ones.
  plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")


def _accumulate(issue, accs):
  """accs + the wgmma products that issue(acc_refs) adds, as one wgmma group
  accumulating in place (the registers stay the accumulator)."""
  return pl.run_state(issue)(tuple(plgpu.ACC.init(a) for a in accs))


def _products_nt(pairs, shape):
  """[a @ b.T for (a, b) in pairs] from SMEM, as one wgmma group (one wait)."""
  def issue(*refs):
    for acc, (a, b) in zip(refs, pairs):
      plgpu.wgmma(acc, a, plgpu.transpose_ref(b, (1, 0)))
    return tuple(r[...] for r in refs)

  return pl.run_scoped(issue, *[plgpu.ACC(shape, jnp.float32) for _ in pairs])


def _filled(shape, value, layout):
  """A constant f32 array in a wgmma register layout."""
  return plgpu.layout_cast(jnp.full(shape, value, jnp.float32), layout)


def _grid_ids(heavy_last: bool):
  """(batch, head, row tile, warpgroup) of this CTA and thread.

  With causal-like masks the last q rows have the longest lists; when
  `heavy_last`, CTAs take row tiles from the end so the long ones start first
  and the short ones fill the tail.
  """
  c = lax.axis_index("rows")
  if heavy_last:
    c = lax.axis_size("rows") - 1 - c
  return (lax.axis_index("batch"), lax.axis_index("heads"), c,
          lax.axis_index("wg"))


def _kernel(body, out_type, scratch, *, grid, wgs):
  return plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=grid,
      grid_names=("heads", "rows", "batch"), num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          approx_math=True,
          # The default changed from Lane (0.10) to Warpgroup (0.11); the
          # kernels are written for Lane.
          lowering_semantics=plgpu.LoweringSemantics.Lane))


def _memory_loop(n_steps, depth, issue, used_barriers):
  """Memory warpgroup: fill the ring, then refill each slot once released."""
  plgpu.set_max_registers(40, action="decrease")
  for i in range(depth):
    pl.when(i < n_steps)(functools.partial(issue, i, i))

  @pl.loop(0, jnp.maximum(n_steps - depth, 0))
  def _(t):
    slot = lax.rem(t, jnp.int32(depth))
    for bar in used_barriers:
      plgpu.barrier_wait(bar.at[slot])
    issue(t + depth, slot)


def _kv_issuer(walk, b, h, row, group, gmem, smem, ready):
  """issue(step, slot): TMA the step's K and V tiles into the ring slot."""
  kvh = lax.div(h, jnp.int32(group))

  def issue(t, slot):
    s = (b, pl.ds(walk.start(b, h, row, t), walk.tile), kvh)
    for src, dst, bar in zip(gmem, smem, ready):
      plgpu.copy_gmem_to_smem(src.at[s], dst.at[slot], bar.at[slot])

  return issue


# --- forward -----------------------------------------------------------------


def _fwd_body(nf_ref, np_ref, idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
              smem, ready, used, sched, *, cfg, schedule_barrier, tile, depth,
              wgs, group, head_dim):
  b, h, c, wg = _grid_ids(heavy_last=True)
  q_smem2, k_smem, v_smem, lse_smem2 = smem
  k_ready, v_ready, q_ready = ready
  k_used, v_used = used
  walk = _Walk(idx_ref, nf_ref, np_ref, cfg.block_kv, tile)
  row = lax.div(c * (ROWS * wgs), jnp.int32(cfg.block_q))
  n_full, n_steps = walk.counts(b, h, row)
  dtype = q_ref.dtype
  ping_pong = wgs == 2 and schedule_barrier

  def schedule():
    if ping_pong:
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

  @pl.when(wg < wgs)
  def _compute():
    _compute_registers(wgs)
    q_smem, lse_smem = q_smem2.at[wg], lse_smem2.at[wg]
    q_base = c * (ROWS * wgs) + wg * ROWS
    _copy_in([(q_ref.at[b, pl.ds(q_base, ROWS), h], q_smem)], q_ready.at[wg])
    m = _filled((ROWS,), -jnp.inf, plgpu.Layout.WGMMA.reduce(1))
    l = _filled((ROWS,), 0.0, plgpu.Layout.WGMMA.reduce(1))
    acc = _filled((ROWS, head_dim), 0.0, plgpu.Layout.WGMMA)

    @pl.when(n_steps > 0)
    def _():
      plgpu.barrier_wait(k_ready.at[0])

    if ping_pong:
      pl.when(wg == 1)(schedule)

    def step(t, carry, masked):
      acc, m, l = carry
      slot = lax.rem(t, jnp.int32(depth))

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot],
                                                         (1, 0)))
        schedule()
        return acc_ref[...]

      s = pl.run_scoped(qk, plgpu.ACC((ROWS, tile), jnp.float32))
      plgpu.barrier_arrive(k_used.at[slot])
      s, _ = block_math.log2_logits(s, cfg.scale, cfg.soft_cap)
      vis = _visible(cfg, b, h, q_base, walk.start(b, h, row, t),
                     (ROWS, tile), 0, masked)
      if vis is not None:
        s = jnp.where(vis, s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=1))
      if vis is not None:  # a row may see nothing yet: keep exp2 off inf-inf
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      else:
        m_use = m_new
      alpha = jnp.exp2(m - m_use)
      p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      l = l * alpha + p.sum(axis=1)
      p16 = p.astype(dtype)
      # As in attention_mgpu: fence the softmax before handing the tensor
      # cores to the other warpgroup.
      acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
      if ping_pong:
        plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(v_ready.at[slot])
      if ping_pong:
        plgpu.barrier_wait(sched)

      def pv(refs):
        plgpu.wgmma(refs[0], p16, v_smem.at[slot])
        nxt = t + 1

        @pl.when(nxt < n_steps)
        def _():
          plgpu.barrier_wait(k_ready.at[lax.rem(nxt, jnp.int32(depth))])

      acc, = _accumulate(pv, (acc,))
      plgpu.barrier_arrive(v_used.at[slot])
      return acc, m_new, l

    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False),
                          (acc, m, l))
    acc, m, l = lax.fori_loop(n_full, n_steps,
                              functools.partial(step, masked=True), carry)
    if ping_pong:
      pl.when(wg == 0)(schedule)
    l_safe = jnp.where(l == 0.0, 1.0, l)  # rows that saw nothing: 0, -inf
    acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
    q_smem[...] = acc.astype(dtype)
    lse_smem[...] = m + jnp.log2(l_safe)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, pl.ds(q_base, ROWS), h])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_base, ROWS)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == wgs)
  def _memory():
    _memory_loop(n_steps, depth,
                 _kv_issuer(walk, b, h, row, group, (k_ref, v_ref),
                            (k_smem, v_smem), (k_ready, v_ready)),
                 (k_used, v_used))


def forward(q, k, v, lists, cfg):
  b, lq, h, d = q.shape
  group = h // k.shape[2]
  tuning = cfg.tuning or TuningConfig()
  tile = tuning.tile("tile_kv_fwd", d, cfg.block_kv)
  wgs = tuning.wgs("fwd", d, cfg.block_q)
  depth = tuning.max_concurrent_steps
  scratch = [
      (_tile_smem(wgs, ROWS, d, q.dtype), _tile_smem(depth, tile, d, k.dtype),
       _tile_smem(depth, tile, d, v.dtype),
       plgpu.SMEM((wgs, ROWS), jnp.float32)),
      (plgpu.Barrier(num_barriers=depth), plgpu.Barrier(num_barriers=depth),
       plgpu.Barrier(num_barriers=wgs)),
      (plgpu.Barrier(num_arrivals=wgs, num_barriers=depth),) * 2,
      plgpu.Barrier(num_arrivals=wgs),
  ]
  body = functools.partial(
      _fwd_body, cfg=cfg, schedule_barrier=tuning.use_schedule_barrier,
      tile=tile, depth=depth, wgs=wgs, group=group, head_dim=d)
  out, lse2 = _kernel(
      body, [jax.ShapeDtypeStruct(q.shape, q.dtype),
             jax.ShapeDtypeStruct((b, h, lq), jnp.float32)], scratch,
      grid=(h, lq // (ROWS * wgs), b), wgs=wgs,
  )(lists["counts_f"], lists["counts_p"], lists["steps"], q, k, v)
  return out, lse2 * block_math.LN2  # lse in nats, -inf stays -inf


# --- backward: dQ over row lists ---------------------------------------------


def _dq_body(nf_ref, np_ref, idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
             delta_ref, dq_ref, smem, ready, used, *, cfg, tile, depth, wgs,
             group, head_dim):
  b, h, c, wg = _grid_ids(heavy_last=True)
  q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem = smem
  q_ready, k_ready, v_ready = ready
  walk = _Walk(idx_ref, nf_ref, np_ref, cfg.block_kv, tile)
  row = lax.div(c * (ROWS * wgs), jnp.int32(cfg.block_q))
  n_full, n_steps = walk.counts(b, h, row)
  dtype = q_ref.dtype

  @pl.when(wg < wgs)
  def _compute():
    _compute_registers(wgs)
    q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
    lse_smem, delta_smem = lse_smem2.at[wg], delta_smem2.at[wg]
    q_base = c * (ROWS * wgs) + wg * ROWS
    rows = pl.ds(q_base, ROWS)
    _copy_in([(q_ref.at[b, rows, h], q_smem), (do_ref.at[b, rows, h], do_smem),
              (lse_ref.at[b, h, rows], lse_smem),
              (delta_ref.at[b, h, rows], delta_smem)], q_ready.at[wg])
    lse = _load_row_vector(lse_smem, plgpu.Layout.WGMMA.reduce(1))
    delta = _load_row_vector(delta_smem, plgpu.Layout.WGMMA.reduce(1))
    dq = _filled((ROWS, head_dim), 0.0, plgpu.Layout.WGMMA)

    def step(t, dq, masked):
      slot = lax.rem(t, jnp.int32(depth))
      plgpu.barrier_wait(k_ready.at[slot])
      plgpu.barrier_wait(v_ready.at[slot])

      s, dp = _products_nt(((q_smem, k_smem.at[slot]),
                            (do_smem, v_smem.at[slot])), (ROWS, tile))
      s, th = block_math.log2_logits(s, cfg.scale, cfg.soft_cap)
      vis = _visible(cfg, b, h, q_base, walk.start(b, h, row, t),
                     (ROWS, tile), 0, masked)
      if vis is not None:
        s = jnp.where(vis, s, -jnp.inf)
      p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
      ds = _dscores(p, dp, lax.broadcast_in_dim(delta, dp.shape, [0]), th,
                    cfg.scale)

      def dsk(refs):
        plgpu.wgmma(refs[0], ds.astype(dtype), k_smem.at[slot])

      dq, = _accumulate(dsk, (dq,))
      plgpu.barrier_arrive(used.at[slot])
      return dq

    dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
    dq = lax.fori_loop(n_full, n_steps, functools.partial(step, masked=True),
                       dq)
    q_smem[...] = dq.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, rows, h])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == wgs)
  def _memory():
    _memory_loop(n_steps, depth,
                 _kv_issuer(walk, b, h, row, group, (k_ref, v_ref),
                            (k_smem, v_smem), (k_ready, v_ready)),
                 (used,))


# --- backward: dK/dV over column lists ---------------------------------------


def _dkv_body(nf_ref, np_ref, idx_ref, k_ref, v_ref, q_ref, do_ref, lse_ref,
              delta_ref, dk_ref, dv_ref, smem, ready, used, *, cfg, tile, depth,
              wgs, group, head_dim):
  b, h, c, wg = _grid_ids(heavy_last=False)
  k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem = smem
  kv_ready, q_ready, do_ready, lse_ready, delta_ready = ready
  walk = _Walk(idx_ref, nf_ref, np_ref, cfg.block_q, tile)
  col = lax.div(c * (ROWS * wgs), jnp.int32(cfg.block_kv))
  n_full, n_steps = walk.counts(b, h, col)
  dtype = k_ref.dtype

  @pl.when(wg < wgs)
  def _compute():
    _compute_registers(wgs)
    k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
    kv_base = c * (ROWS * wgs) + wg * ROWS
    rows = pl.ds(kv_base, ROWS)
    kvh = lax.div(h, jnp.int32(group))
    _copy_in([(k_ref.at[b, rows, kvh], k_smem),
              (v_ref.at[b, rows, kvh], v_smem)], kv_ready.at[wg])
    zeros = _filled((ROWS, head_dim), 0.0, plgpu.Layout.WGMMA)

    def step(t, carry, masked):
      dk, dv = carry
      slot = lax.rem(t, jnp.int32(depth))
      for ready_bar in (q_ready, lse_ready, do_ready, delta_ready):
        plgpu.barrier_wait(ready_bar.at[slot])

      # Transposed tiles: [kv rows, q columns].
      s, dp = _products_nt(((k_smem, q_smem.at[slot]),
                            (v_smem, do_smem.at[slot])), (ROWS, tile))
      s, th = block_math.log2_logits(s, cfg.scale, cfg.soft_cap)
      vis = _visible(cfg, b, h, walk.start(b, h, col, t), kv_base,
                     (ROWS, tile), 1, masked)
      if vis is not None:
        s = jnp.where(vis, s, -jnp.inf)
      row_vec = functools.partial(_load_row_vector,
                                  layout=plgpu.Layout.WGMMA.reduce(0))
      lse, delta = row_vec(lse_smem.at[slot]), row_vec(delta_smem.at[slot])
      p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [1]))
      ds = _dscores(p, dp, lax.broadcast_in_dim(delta, dp.shape, [1]), th,
                    cfg.scale)

      def dv_and_dk(refs):  # dV += p^T dO, dK += dS^T Q: one wgmma group
        plgpu.wgmma(refs[0], p.astype(dtype), do_smem.at[slot])
        plgpu.wgmma(refs[1], ds.astype(dtype), q_smem.at[slot])

      dv, dk = _accumulate(dv_and_dk, (dv, dk))
      plgpu.barrier_arrive(used.at[slot])
      return dk, dv

    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False),
                          (zeros, zeros))
    dk, dv = lax.fori_loop(n_full, n_steps,
                           functools.partial(step, masked=True), carry)
    k_smem[...] = dk.astype(dtype)
    v_smem[...] = dv.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, rows, h], commit_group=False)
    plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, rows, h], commit_group=False)
    plgpu.commit_smem_to_gmem_group()
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == wgs)
  def _memory():
    def issue(t, slot):
      rows = pl.ds(walk.start(b, h, col, t), tile)
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot],
                              q_ready.at[slot])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot],
                              lse_ready.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot],
                              do_ready.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[slot],
                              delta_ready.at[slot])

    _memory_loop(n_steps, depth, issue, (used,))


def backward(q, k, v, out, lse, do, delta, lists, cfg):
  del out
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  group = h // hkv
  tuning = cfg.tuning or TuningConfig()
  depth = tuning.max_concurrent_steps
  do = do.astype(q.dtype)
  # Base-2 lse; rows that saw nothing get +inf so that p = exp2(s - lse) = 0.
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * block_math.LOG2E)
  bar = lambda n: plgpu.Barrier(num_barriers=n)

  tile = tuning.tile("tile_kv_dq", d, cfg.block_kv)
  wgs = tuning.wgs("bwd", d, cfg.block_q)
  dq = _kernel(
      functools.partial(_dq_body, cfg=cfg, tile=tile, depth=depth, wgs=wgs,
                        group=group, head_dim=d),
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      [(_tile_smem(wgs, ROWS, d, q.dtype), _tile_smem(wgs, ROWS, d, q.dtype),
        plgpu.SMEM((wgs, ROWS), jnp.float32),
        plgpu.SMEM((wgs, ROWS), jnp.float32),
        _tile_smem(depth, tile, d, k.dtype),
        _tile_smem(depth, tile, d, v.dtype)),
       (bar(wgs), bar(depth), bar(depth)),
       plgpu.Barrier(num_arrivals=wgs, num_barriers=depth)],
      grid=(h, lq // (ROWS * wgs), b), wgs=wgs,
  )(lists["counts_f"], lists["counts_p"], lists["steps"], q, k, v, do, lse2,
    delta)

  tile = tuning.tile("tile_q_dkv", d, cfg.block_q)
  wgs = tuning.wgs("bwd", d, cfg.block_kv)
  per_head = jax.ShapeDtypeStruct((b, lk, h, d), k.dtype)
  dk, dv = _kernel(
      functools.partial(_dkv_body, cfg=cfg, tile=tile, depth=depth, wgs=wgs,
                        group=group, head_dim=d),
      [per_head, per_head],
      [(_tile_smem(wgs, ROWS, d, k.dtype), _tile_smem(wgs, ROWS, d, v.dtype),
        _tile_smem(depth, tile, d, q.dtype),
        _tile_smem(depth, tile, d, q.dtype),
        plgpu.SMEM((depth, tile), jnp.float32),
        plgpu.SMEM((depth, tile), jnp.float32)),
       (bar(wgs), bar(depth), bar(depth), bar(depth), bar(depth)),
       plgpu.Barrier(num_arrivals=wgs, num_barriers=depth)],
      grid=(h, lk // (ROWS * wgs), b), wgs=wgs,
  )(lists["counts_f_t"], lists["counts_p_t"], lists["steps_t"], k, v, q, do,
    lse2, delta)
  if group > 1:  # dK/dV were written per q head: sum each kv head's group
    dk = dk.reshape(b, lk, hkv, group, d).astype(jnp.float32).sum(3)
    dv = dv.reshape(b, lk, hkv, group, d).astype(jnp.float32).sum(3)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype)


# --- entry -------------------------------------------------------------------


def _merge(counts_f, idx_f, counts_p, idx_p):
  """Per row: the full entries, then the partial ones, in one list."""
  width = idx_f.shape[-1] + idx_p.shape[-1]
  t = jnp.arange(width, dtype=jnp.int32)
  nf = counts_f[..., None]
  from_f = jnp.take_along_axis(idx_f, jnp.minimum(t, idx_f.shape[-1] - 1)
                               + jnp.zeros_like(nf), -1)
  from_p = jnp.take_along_axis(
      idx_p, jnp.clip(t - nf, 0, idx_p.shape[-1] - 1), -1)
  return jnp.where(t < nf, from_f, from_p)


def _step_lists(lists):
  return {
      "counts_f": lists["full_counts"], "counts_p": lists["partial_counts"],
      "steps": _merge(lists["full_counts"], lists["full_idx"],
                      lists["partial_counts"], lists["partial_idx"]),
      "counts_f_t": lists["full_counts_t"],
      "counts_p_t": lists["partial_counts_t"],
      "steps_t": _merge(lists["full_counts_t"], lists["full_idx_t"],
                        lists["partial_counts_t"], lists["partial_idx_t"]),
  }


_attention = make_vjp(forward, backward)


def attention(q, k, v, lists, cfg):
  """custom_vjp attention over block-padded inputs (see module docstring)."""
  reason = unsupported(q.dtype, q.shape[-1], cfg.block_q, cfg.block_kv)
  if reason is not None:
    raise ValueError(f"impl='pallas_mosaic_gpu' {reason}")
  return _attention(q, k, v, _step_lists(lists), cfg)
