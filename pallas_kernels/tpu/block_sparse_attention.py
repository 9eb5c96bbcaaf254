"""Block-sparse flash attention for TPU: Pallas with the Mosaic lowering.

The BlockMask lists are scalar-prefetch operands (SMEM), and the k/v (or q)
BlockSpec index_maps read them, so the pipeline DMAs only listed blocks and
the grid never visits an unlisted one. Being operands rather than constants,
a new mask of the same list shapes reuses the compiled kernel.

Grid: (batch, q head, q block, list step) for forward and dQ, and
(batch, q head, kv block, list step) for dK/dV over the transposed lists. The
last axis ("arbitrary") walks ONE concatenated list: steps [0, Wf) read the
full list, steps [Wf, Wf + Wp) the partial list (dropped when there is no
mask_fn: then every listed block is full). A step past its section's count
computes nothing (`pl.when`), and its index_map returns a block that is
already resident (the list repeats its last valid index), so no DMA is issued.
Full blocks skip the element mask; partial ones apply `cfg.mask_fn` on iota
indices, plus the kv_len range when kv_len is not a block multiple.

Layout: q/k/v stay [B, L, H, D] and are viewed as [B, L, H * D] (a free
reshape); a (block, D) tile of head h is block index (b, i, h) on that view,
so no transposes are needed. That needs D % 128 == 0 on hardware: other head
dims are zero-padded to the next multiple of 128 (exact: zero columns add
nothing to q.k and give zero output columns, sliced off). lse and delta
travel as [B, H, L, 1] so each q block sees a (block_q, 1) column.

GQA: the kv index_map reads kv head h // group; dK/dV are computed per q head
and summed over each kv head's group in XLA (as the Triton kernel does).

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
from jax.experimental.pallas import tpu as pltpu

from sparsejax import block_math
from sparsejax.vjp import make_vjp

NUM_LANES = 128
NUM_SUBLANES = 8
_NUM_LISTS = 4  # scalar-prefetch operands: counts, idx (full), same (partial)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Compiler settings; the block sizes come from the BlockMask.

  Masks default to 128 x 128 blocks, which suit the TPU: block_q fills the
  MXU rows and block_kv the 128 lanes of the score tile.
  """
  # Mark (batch, head, block) grid axes "parallel" so megacore chips (v4,
  # v5p) split them across TensorCores; the list axis is always "arbitrary".
  megacore: bool = True
  # Scoped VMEM limit for Mosaic; None keeps the compiler default. Raise it
  # for head_dim 256 with large blocks.
  vmem_limit_bytes: Optional[int] = None

  def __post_init__(self):
    if not isinstance(self.megacore, bool):
      raise ValueError(f"megacore must be a bool, got {self.megacore!r}")
    if self.vmem_limit_bytes is not None and (
        not isinstance(self.vmem_limit_bytes, int)
        or self.vmem_limit_bytes < (1 << 20)):
      raise ValueError(f"vmem_limit_bytes must be None or an int >= 1 MiB, "
                       f"got {self.vmem_limit_bytes!r}")

  def compiler_params(self) -> pltpu.CompilerParams:
    par = "parallel" if self.megacore else "arbitrary"
    return pltpu.CompilerParams(
        dimension_semantics=(par, par, par, "arbitrary"),
        vmem_limit_bytes=self.vmem_limit_bytes)


def validate_blocks(block_q: int, block_kv: int, head_dim: int, *,
                    interpret) -> None:
  """Checks the kernel tile sizes against TPU (8, 128) tiling.

  On hardware: block_q is a sublane dimension (multiple of 8); block_kv is
  the lane dimension of the score tile and head_dim that of the q/k/v tiles
  (multiples of 128). Interpret mode on CPU has no tiling, so any positive
  sizes are allowed there: the shared test suite uses blocks of 16/32 and
  head_dim 16..64, which real TPUs would reject (head_dim is padded to 128
  by `forward`/`backward` on hardware, blocks are not).
  """
  for name, val in (("block_q", block_q), ("block_kv", block_kv),
                    ("head_dim", head_dim)):
    if not isinstance(val, int) or val <= 0:
      raise ValueError(f"{name} must be a positive int, got {val!r}")
  if interpret:
    return
  if block_q % NUM_SUBLANES:
    raise ValueError(f"pallas_tpu needs block_q a multiple of {NUM_SUBLANES} "
                     f"(TPU sublanes), got {block_q}")
  if block_kv % NUM_LANES:
    raise ValueError(f"pallas_tpu needs block_kv a multiple of {NUM_LANES} "
                     f"(TPU lanes), got {block_kv}")
  if head_dim % NUM_LANES:
    raise ValueError(f"pallas_tpu needs head_dim a multiple of {NUM_LANES} "
                     f"(TPU lanes), got {head_dim}")


def _interpret_params(flag):
  """pallas_call's `interpret` for cfg.interpret (False on hardware)."""
  if not flag:
    return False
  if isinstance(flag, pltpu.InterpretParams):
    return flag
  # TPU interpret mode simulates SMEM/VMEM, the DMA pipeline and megacore,
  # and its race detector checks the accumulator/output protocol.
  return pltpu.InterpretParams(detect_races=True)


def _tuning(cfg) -> TuningConfig:
  if cfg.tuning is None:
    return TuningConfig()
  if not isinstance(cfg.tuning, TuningConfig):
    raise ValueError(f"tuning for impl='pallas_tpu' must be a pallas_kernels."
                     f"tpu.block_sparse_attention.TuningConfig, got "
                     f"{type(cfg.tuning).__name__}")
  return cfg.tuning


def _kernel_head_dim(d: int, interpret) -> int:
  return d if interpret else -(-d // NUM_LANES) * NUM_LANES


def _heads_view(x, d_kernel):
  """[B, L, H, D] -> [B, L, H * d_kernel] (zero-padding D)."""
  b, l, h, d = x.shape
  if d_kernel != d:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, d_kernel - d)))
  return x.reshape(b, l, h * d_kernel)


def _unview(x, heads, d):
  b, l, _ = x.shape
  return x.reshape(b, l, heads, -1)[..., :d]


# --- the concatenated list --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Walk:
  """Static shape of one row's walk: Wf full steps, then Wp partial steps."""
  wf: int
  wp: int  # 0 when there is no mask_fn (no partial blocks exist)

  @property
  def steps(self) -> int:
    return self.wf + self.wp

  def block(self, row, j, fc, fi, pc, pi):
    """The block DMA'd at step j of row (b, h, r): listed, else resident.

    Inside a section, entries past the count repeat its last valid index, so
    they name the block already in VMEM. An empty full section prefetches the
    first partial block; an empty partial section keeps the last full one.
    """
    f = fi[row + (jnp.minimum(j, self.wf - 1),)]
    if not self.wp:
      return f
    p = pi[row + (jnp.clip(j - self.wf, 0, self.wp - 1),)]
    in_full = jnp.where(fc[row] > 0, f, pi[row + (0,)])
    in_part = jnp.where(pc[row] > 0, p, fi[row + (self.wf - 1,)])
    return jnp.where(j < self.wf, in_full, in_part)

  def sections(self, cfg):
    """(first step, count ref index, idx ref index, mask_fn) per section."""
    out = [(0, 0, 1, None)]
    if self.wp:
      out.append((self.wf, 2, 3, cfg.mask_fn))
    return out


def _walk(lists, suffix: str, cfg) -> _Walk:
  wp = lists["partial_idx" + suffix].shape[-1] if cfg.mask_fn is not None else 0
  return _Walk(lists["full_idx" + suffix].shape[-1], wp)


def _run_sections(walk, cfg, list_refs, row, j, body):
  """Calls body(block, mask_fn) under pl.when for a step inside a count."""
  for start, ci, ii, fn in walk.sections(cfg):
    count, idx = list_refs[ci][row], list_refs[ii]
    width = walk.wf if start == 0 else walk.wp

    @pl.when((j >= start) & (j < start + count))
    def _(start=start, idx=idx, width=width, fn=fn):
      body(idx[row + (jnp.clip(j - start, 0, width - 1),)], fn)


def _col(ref):
  """A (block, 1) column ref value as the 1-D vector block_math expects."""
  return ref[...][:, 0]


# --- forward ----------------------------------------------------------------


def _fwd_kernel(fc, fi, pc, pi, q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref,
                l_ref, acc_ref, *, cfg, walk):
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, i, j = (pl.program_id(a) for a in range(4))
  row = (b, h, i)
  ragged = cfg.kv_len % bk != 0

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def body(kv_block, fn):
    s = block_math.scores(q_ref[...], k_ref[...], cfg.scale, cfg.soft_cap)
    vis = block_math.element_mask(fn, b, h, i * bq, kv_block * bk, bq, bk,
                                  cfg.kv_len, ragged)
    m, l, acc = block_math.online_softmax_step(
        s, v_ref[...], _col(m_ref), _col(l_ref), acc_ref[...], vis)
    m_ref[...] = m[:, None]
    l_ref[...] = l[:, None]
    acc_ref[...] = acc

  _run_sections(walk, cfg, (fc, fi, pc, pi), row, j, body)

  @pl.when(j == walk.steps - 1)
  def _finish():
    out, lse = block_math.finalize(_col(m_ref), _col(l_ref), acc_ref[...],
                                   o_ref.dtype)
    o_ref[...] = out
    lse_ref[...] = lse[:, None]


def forward(q, k, v, lists, cfg):
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  group = h // hkv
  bq, bk = cfg.block_q, cfg.block_kv
  nq = lq // bq
  interpret = _interpret_params(cfg.interpret)
  dp = _kernel_head_dim(d, interpret)
  validate_blocks(bq, bk, dp, interpret=interpret)
  tuning = _tuning(cfg)
  walk = _walk(lists, "", cfg)

  def kv_map(bb, hh, i, j, *refs):
    return bb, walk.block((bb, hh, i), j, *refs), hh // group

  q_spec = pl.BlockSpec((None, bq, dp), lambda bb, hh, i, j, *_: (bb, i, hh))
  kv_spec = pl.BlockSpec((None, bk, dp), kv_map)
  lse_spec = pl.BlockSpec((None, None, bq, 1),
                          lambda bb, hh, i, j, *_: (bb, hh, i, 0))
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, walk=walk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=_NUM_LISTS,
          grid=(b, h, nq, walk.steps),
          in_specs=[q_spec, kv_spec, kv_spec],
          out_specs=[q_spec, lse_spec],
          scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32),
                          pltpu.VMEM((bq, 1), jnp.float32),
                          pltpu.VMEM((bq, dp), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, lq, h * dp), q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq, 1), jnp.float32)],
      compiler_params=tuning.compiler_params(),
      interpret=interpret,
      name="sparsejax_block_sparse_fwd_tpu",
  )(lists["full_counts"], lists["full_idx"], lists["partial_counts"],
    lists["partial_idx"], _heads_view(q, dp), _heads_view(k, dp),
    _heads_view(v, dp))
  return _unview(out, h, d), lse[..., 0]


# --- backward: dQ over row lists --------------------------------------------


def _dq_kernel(fc, fi, pc, pi, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, acc_ref, *, cfg, walk):
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, i, j = (pl.program_id(a) for a in range(4))
  ragged = cfg.kv_len % bk != 0

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def body(kv_block, fn):
    k = k_ref[...]
    vis = block_math.element_mask(fn, b, h, i * bq, kv_block * bk, bq, bk,
                                  cfg.kv_len, ragged)
    _, ds = block_math.probs_and_dscores(
        q_ref[...], k, v_ref[...], do_ref[...], _col(lse_ref),
        _col(delta_ref), cfg.scale, cfg.soft_cap, vis)
    acc_ref[...] += jax.lax.dot(ds.astype(k.dtype), k,
                                precision=block_math.dot_precision(k.dtype),
                                preferred_element_type=jnp.float32)

  _run_sections(walk, cfg, (fc, fi, pc, pi), (b, h, i), j, body)

  @pl.when(j == walk.steps - 1)
  def _finish():
    dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


# --- backward: dK/dV over column lists --------------------------------------


def _dkv_kernel(fc, fi, pc, pi, k_ref, v_ref, q_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, cfg, walk):
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, c, j = (pl.program_id(a) for a in range(4))
  ragged = cfg.kv_len % bk != 0

  @pl.when(j == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def body(q_block, fn):
    q, do = q_ref[...], do_ref[...]
    vis = block_math.element_mask(fn, b, h, q_block * bq, c * bk, bq, bk,
                                  cfg.kv_len, ragged)
    p, ds = block_math.probs_and_dscores(
        q, k_ref[...], v_ref[...], do, _col(lse_ref), _col(delta_ref),
        cfg.scale, cfg.soft_cap, vis)
    prec = block_math.dot_precision(q.dtype)
    dims = (((0,), (0,)), ((), ()))  # p^T @ do, ds^T @ q
    dk_acc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, dims,
                                       precision=prec,
                                       preferred_element_type=jnp.float32)
    dv_acc[...] += jax.lax.dot_general(p.astype(do.dtype), do, dims,
                                       precision=prec,
                                       preferred_element_type=jnp.float32)

  _run_sections(walk, cfg, (fc, fi, pc, pi), (b, h, c), j, body)

  @pl.when(j == walk.steps - 1)
  def _finish():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def backward(q, k, v, out, lse, do, delta, lists, cfg):
  del out
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  group = h // hkv
  bq, bk = cfg.block_q, cfg.block_kv
  nq, nk = lq // bq, lk // bk
  interpret = _interpret_params(cfg.interpret)
  dp = _kernel_head_dim(d, interpret)
  validate_blocks(bq, bk, dp, interpret=interpret)
  params = _tuning(cfg).compiler_params()
  qv, kv, vv = (_heads_view(x, dp) for x in (q, k, v))
  dov = _heads_view(do.astype(q.dtype), dp)
  lse4, delta4 = lse[..., None], delta[..., None]

  # dQ: the forward's grid and row lists.
  walk = _walk(lists, "", cfg)

  def kv_map(bb, hh, i, j, *refs):
    return bb, walk.block((bb, hh, i), j, *refs), hh // group

  q_spec = pl.BlockSpec((None, bq, dp), lambda bb, hh, i, j, *_: (bb, i, hh))
  kv_spec = pl.BlockSpec((None, bk, dp), kv_map)
  row_spec = pl.BlockSpec((None, None, bq, 1),
                          lambda bb, hh, i, j, *_: (bb, hh, i, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, walk=walk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=_NUM_LISTS,
          grid=(b, h, nq, walk.steps),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((bq, dp), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((b, lq, h * dp), q.dtype),
      compiler_params=params,
      interpret=interpret,
      name="sparsejax_block_sparse_dq_tpu",
  )(lists["full_counts"], lists["full_idx"], lists["partial_counts"],
    lists["partial_idx"], qv, kv, vv, dov, lse4, delta4)

  # dK/dV: per q head over the transposed (column) lists.
  walk_t = _walk(lists, "_t", cfg)

  def q_map(bb, hh, c, j, *refs):
    return bb, walk_t.block((bb, hh, c), j, *refs), hh

  def col_map(bb, hh, c, j, *refs):
    return bb, hh, walk_t.block((bb, hh, c), j, *refs), 0

  kv_blk = pl.BlockSpec((None, bk, dp), lambda bb, hh, c, j, *_: (bb, c,
                                                                 hh // group))
  q_blk = pl.BlockSpec((None, bq, dp), q_map)
  col_spec = pl.BlockSpec((None, None, bq, 1), col_map)
  out_blk = pl.BlockSpec((None, bk, dp), lambda bb, hh, c, j, *_: (bb, c, hh))
  dkv_dtype = k.dtype if group == 1 else jnp.float32
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, walk=walk_t),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=_NUM_LISTS,
          grid=(b, h, nk, walk_t.steps),
          in_specs=[kv_blk, kv_blk, q_blk, q_blk, col_spec, col_spec],
          out_specs=[out_blk, out_blk],
          scratch_shapes=[pltpu.VMEM((bk, dp), jnp.float32),
                          pltpu.VMEM((bk, dp), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, lk, h * dp), dkv_dtype)] * 2,
      compiler_params=params,
      interpret=interpret,
      name="sparsejax_block_sparse_dkv_tpu",
  )(lists["full_counts_t"], lists["full_idx_t"], lists["partial_counts_t"],
    lists["partial_idx_t"], kv, vv, qv, dov, lse4, delta4)

  dk, dv = _unview(dk, h, d), _unview(dv, h, d)
  if group > 1:  # sum the q heads of each kv head
    dk = dk.reshape(b, lk, hkv, group, d).sum(3).astype(k.dtype)
    dv = dv.reshape(b, lk, hkv, group, d).sum(3).astype(v.dtype)
  return _unview(dq, h, d), dk, dv


attention = make_vjp(forward, backward)
