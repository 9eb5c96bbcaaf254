"""Batched window attention with a fused relative bias: Pallas, Triton lowering.

MaxViT's windows are small (49 tokens at P=7, 144 at P=12) and numerous (64
images x 64 windows), so one program owns one head of `windows_per_program`
windows and keeps each window's whole score row in registers: no online
softmax, no lse, and the backward recomputes the softmax exactly.

- Tokens are read in place: `WindowLayout.rows` maps (window, position) to a
  row of the image [B*X*Y, H, D] (block or grid partition fused into the
  loads, as index vectors) or of a pre-partitioned [B*nW*T, H, D] array.
- The window is padded to tiles inside the kernel: queries in `block_q` row
  sub-tiles, keys in `block_kv` chunks (powers of two, as Triton needs);
  padded positions load a clamped valid row, padded keys get -inf from the
  bias tile, padded rows are never stored (out-of-range row + store mask).
- The bias is one [heads, Tq, Tk] f32 tile (log2 domain, -inf on padded
  keys) added in registers. Its gradient dS is summed per program over its
  windows into [programs, heads, Tq, Tk] and reduced outside in a fixed
  order (deterministic), then mapped back to the table by the einsum of
  `sparsejax.vision.relative_bias.bias_matrix` in XLA.
- Backward: one kernel per (window group, head) computes dQ, dK, dV and dS
  of each window from q, k, v, dO (a window's gradients never leave it).

`window_attention` (bottom) is the custom_vjp entry; the definition it must
match is `sparsejax.vision.reference.window_reference`.
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


def _pow2(x):
  return x >= 16 and not x & (x - 1)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Windows per program, the query/key tiles of a window, warps.

  None derives a default from the problem: block_q 64 (32 above 64
  tokens), block_kv the padded window up to 64 (32 above), about 1024
  forward and 512 backward programs.
  """
  windows_per_program: Optional[int] = None
  windows_per_program_bwd: Optional[int] = None
  block_q: Optional[int] = None
  block_kv: Optional[int] = None
  num_warps: int = 4
  num_stages: int = 1

  def __post_init__(self):
    for name in ("windows_per_program", "windows_per_program_bwd"):
      w = getattr(self, name)
      if w is not None and (not isinstance(w, int) or w < 1):
        raise ValueError(f"{name} must be a positive int, got {w!r}")
    for name in ("block_q", "block_kv"):
      b = getattr(self, name)
      if b is not None and (not isinstance(b, int) or not _pow2(b) or b > 256):
        raise ValueError(f"{name} must be a power of two in [16, 256], got "
                         f"{b!r}")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"num_warps must be a power of two <= 16, got "
                       f"{self.num_warps}")
    if not 1 <= self.num_stages <= 4:
      raise ValueError(f"num_stages must be in [1, 4], got {self.num_stages}")


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static shape of one call (hashable: it parameterises the kernels)."""
  layout: object      # sparsejax.vision.permute.WindowLayout
  num_windows: int    # over the whole batch
  heads: int
  head_dim: int
  scale: float
  block_q: int
  block_kv: int
  group: int          # windows per program (forward)
  group_bwd: int
  interpret: bool

  @property
  def tokens(self):
    return self.layout.tokens

  @property
  def nq(self):
    return -(-self.tokens // self.block_q)

  @property
  def nk(self):
    return -(-self.tokens // self.block_kv)

  def programs(self, bwd=False):
    return -(-self.num_windows // (self.group_bwd if bwd else self.group))

  def rows(self, w, start, size, rows_total):
    """(load rows, store rows, valid) of positions [start, start + size)."""
    t = start + jax.lax.broadcasted_iota(jnp.int32, (size,), 0)
    valid = t < self.tokens
    load = self.layout.rows(w, jnp.minimum(t, self.tokens - 1))
    # Out of range for padded positions: dropped by the masked store (and
    # by interpret mode's scatter).
    return load, jnp.where(valid, load, rows_total), valid


def make_geometry(layout, num_windows, heads, head_dim, scale, tuning,
                  interpret) -> Geometry:
  tuning = tuning or TuningConfig()
  if not isinstance(tuning, TuningConfig):
    raise ValueError(f"tuning for the Triton window kernel must be a "
                     f"pallas_kernels.gpu.window_attention.TuningConfig, got "
                     f"{type(tuning).__name__}")
  t = layout.tokens
  padded = max(16, next_power_of_2(t))
  bq = tuning.block_q or (min(padded, 64) if t <= 64 else 32)
  bk = tuning.block_kv or (min(padded, 64) if t <= 64 else 32)
  work = num_windows * heads
  g = tuning.windows_per_program or max(1, min(64, round(work / 1024)))
  gb = tuning.windows_per_program_bwd or max(1, min(128, round(work / 512)))
  return Geometry(layout, num_windows, heads, head_dim, float(scale), bq, bk,
                  min(g, num_windows), min(gb, num_windows), bool(interpret))


def padded_bias(bias, geo: Geometry):
  """[H|1, T, T] f32 (or None) -> [H|1, Tq, Tk] log2-domain, -inf keys pad."""
  t = geo.tokens
  tq, tk = geo.nq * geo.block_q, geo.nk * geo.block_kv
  if bias is None:
    bias = jnp.zeros((1, t, t), jnp.float32)
  b = bias.astype(jnp.float32) * block_math.LOG2E
  b = jnp.pad(b, ((0, 0), (0, tq - t), (0, 0)))
  return jnp.pad(b, ((0, 0), (0, 0), (0, tk - t)), constant_values=-jnp.inf)


def _cols(d):
  return jax.lax.broadcasted_iota(jnp.int32, (d,), 0)[None, :]


def _load(ref, rows, d):
  return ref[rows[:, None], _cols(d)]


def _store(ref, rows, valid, value):
  pltriton.store(ref.at[rows[:, None], _cols(value.shape[1])],
                 value.astype(ref.dtype), mask=valid[:, None])


def _dot_nt(a, b):  # a @ b.T, f32 accumulation
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             precision=block_math.dot_precision(a.dtype),
                             preferred_element_type=jnp.float32)


def _dot_nn(a, b):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                             precision=block_math.dot_precision(a.dtype),
                             preferred_element_type=jnp.float32)


def _dot_tn(a, b):  # a.T @ b
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                             precision=block_math.dot_precision(a.dtype),
                             preferred_element_type=jnp.float32)


def _window_range(geo, bwd):
  g = geo.group_bwd if bwd else geo.group
  first = pl.program_id(0) * g
  return first, jnp.minimum(g, geo.num_windows - first)


def _kv_tiles(geo, k_ref, v_ref, w, rows_total):
  out = []
  for c in range(geo.nk):
    load, store, valid = geo.rows(w, c * geo.block_kv, geo.block_kv,
                                  rows_total)
    out.append((_load(k_ref, load, geo.head_dim),
                _load(v_ref, load, geo.head_dim), store, valid))
  return out


def _probs(geo, q, kvs, b_ref, a):
  """Softmax of one query sub-tile against every key chunk (base 2)."""
  bq, bk = geo.block_q, geo.block_kv
  s = [_dot_nt(q, kt) * (geo.scale * block_math.LOG2E)
       + b_ref[pl.ds(a * bq, bq), pl.ds(c * bk, bk)]
       for c, (kt, _, _, _) in enumerate(kvs)]
  m = functools.reduce(jnp.maximum, [x.max(-1) for x in s])
  p = [jnp.exp2(x - m[:, None]) for x in s]
  l = functools.reduce(jnp.add, [x.sum(-1) for x in p])
  return [x / l[:, None] for x in p]


# --- forward -----------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, b_ref, o_ref, *, geo: Geometry):
  n_rows = q_ref.shape[0]
  first, count = _window_range(geo, bwd=False)

  def window(i, carry):
    w = first + i
    kvs = _kv_tiles(geo, k_ref, v_ref, w, n_rows)
    for a in range(geo.nq):
      load, store, valid = geo.rows(w, a * geo.block_q, geo.block_q, n_rows)
      q = _load(q_ref, load, geo.head_dim)
      p = _probs(geo, q, kvs, b_ref, a)
      o = functools.reduce(jnp.add, [_dot_nn(pc.astype(vt.dtype), vt)
                                     for pc, (_, vt, _, _) in zip(p, kvs)])
      _store(o_ref, store, valid, o)
    return carry

  jax.lax.fori_loop(0, count, window, 0)


def _head_spec(n, d):
  return pl.BlockSpec((n, None, d), lambda g, h: (0, h, 0))


def _bias_spec(bias):
  shared = bias.shape[0] == 1
  return pl.BlockSpec((None,) + bias.shape[1:],
                      lambda g, h: (0 if shared else h, 0, 0))


def forward(q, k, v, bias2, geo: Geometry, tuning: TuningConfig):
  n, h, d = q.shape
  spec = _head_spec(n, d)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, geo=geo),
      grid=(geo.programs(), h),
      in_specs=[spec, spec, spec, _bias_spec(bias2)],
      out_specs=spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps,
                                              num_stages=tuning.num_stages),
      interpret=geo.interpret, name="sparsejax_window_attention_fwd",
  )(q, k, v, bias2)


# --- backward ----------------------------------------------------------------


def _bwd_kernel(q_ref, k_ref, v_ref, do_ref, b_ref, dq_ref, dk_ref, dv_ref,
                db_ref, *, geo: Geometry):
  n_rows = q_ref.shape[0]
  d = geo.head_dim
  bq, bk = geo.block_q, geo.block_kv
  first, count = _window_range(geo, bwd=True)
  zeros = [[jnp.zeros((bq, bk), jnp.float32) for _ in range(geo.nk)]
           for _ in range(geo.nq)]

  def window(i, db):
    w = first + i
    kvs = _kv_tiles(geo, k_ref, v_ref, w, n_rows)
    dk = [jnp.zeros((bk, d), jnp.float32) for _ in range(geo.nk)]
    dv = [jnp.zeros((bk, d), jnp.float32) for _ in range(geo.nk)]
    db = [list(row) for row in db]
    for a in range(geo.nq):
      load, store, valid = geo.rows(w, a * bq, bq, n_rows)
      q, do = _load(q_ref, load, d), _load(do_ref, load, d)
      # Padded query rows hold a copy of a real row: keep them out of
      # dK, dV and dS.
      p = [jnp.where(valid[:, None], pc, 0.0)
           for pc in _probs(geo, q, kvs, b_ref, a)]
      dp = [_dot_nt(do, vt) for (_, vt, _, _) in kvs]
      delta = functools.reduce(jnp.add, [(pc * dpc).sum(-1)
                                         for pc, dpc in zip(p, dp)])
      ds = [pc * (dpc - delta[:, None]) for pc, dpc in zip(p, dp)]
      dq = functools.reduce(jnp.add, [_dot_nn(dsc.astype(kt.dtype), kt)
                                      for dsc, (kt, _, _, _) in zip(ds, kvs)])
      _store(dq_ref, store, valid, dq * geo.scale)
      for c in range(geo.nk):
        dk[c] = dk[c] + _dot_tn(ds[c].astype(q.dtype), q)
        dv[c] = dv[c] + _dot_tn(p[c].astype(do.dtype), do)
        db[a][c] = db[a][c] + ds[c]
    for c, (_, _, store, valid) in enumerate(kvs):
      _store(dk_ref, store, valid, dk[c] * geo.scale)
      _store(dv_ref, store, valid, dv[c])
    return db

  db = jax.lax.fori_loop(0, count, window, zeros)
  for a in range(geo.nq):
    for c in range(geo.nk):
      db_ref[pl.ds(a * bq, bq), pl.ds(c * bk, bk)] = db[a][c]


def backward(q, k, v, do, bias2, geo: Geometry, tuning: TuningConfig):
  n, h, d = q.shape
  spec = _head_spec(n, d)
  tq, tk = bias2.shape[1:]
  programs = geo.programs(bwd=True)
  dq, dk, dv, db = pl.pallas_call(
      functools.partial(_bwd_kernel, geo=geo),
      grid=(programs, h),
      in_specs=[spec, spec, spec, spec, _bias_spec(bias2)],
      out_specs=[spec, spec, spec,
                 pl.BlockSpec((None, None, tq, tk), lambda g, hh: (g, hh, 0,
                                                                   0))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] * 3
      + [jax.ShapeDtypeStruct((programs, h, tq, tk), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps,
                                              num_stages=tuning.num_stages),
      interpret=geo.interpret, name="sparsejax_window_attention_bwd",
  )(q, k, v, do.astype(q.dtype), bias2)
  t = geo.tokens
  db = db.sum(0)[:, :t, :t]  # fixed-order reduction over programs
  if bias2.shape[0] == 1:
    db = db.sum(0, keepdims=True)
  return dq, dk, dv, db


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, bias, geo, tuning):
  return forward(q, k, v, padded_bias(bias, geo), geo, tuning)


def _attention_fwd(q, k, v, bias, geo, tuning):
  return _attention(q, k, v, bias, geo, tuning), (q, k, v, bias)


def _attention_bwd(geo, tuning, res, do):
  q, k, v, bias = res
  dq, dk, dv, db = backward(q, k, v, do, padded_bias(bias, geo), geo, tuning)
  return dq, dk, dv, db


_attention.defvjp(_attention_fwd, _attention_bwd)


def window_attention(q, k, v, layout, bias, scale, *, interpret=False,
                     tuning=None):
  """q, k, v: [B, X, Y, H, D] (block/grid layout) or [B, nW, T, H, D]
  (contiguous); bias [H|1, T, T] f32 or None. Output in q's layout."""
  shape = q.shape
  h, d = shape[-2], shape[-1]
  num_windows = shape[0] * layout.windows_per_image if (
      layout.kind != "contiguous") else shape[0] * shape[1]
  geo = make_geometry(layout, num_windows, h, d, scale, tuning, interpret)
  flat = lambda x: x.reshape(-1, h, d)
  if bias is None:  # no table: a constant tile, nothing to differentiate
    bias = jax.lax.stop_gradient(jnp.zeros((1, geo.tokens, geo.tokens),
                                           jnp.float32))
  out = _attention(flat(q), flat(k), flat(v), bias.astype(jnp.float32), geo,
                   tuning or TuningConfig())
  return out.reshape(shape)
