"""Lightning Attention-2 for GPU: Pallas with the Triton lowering.

A program walks chunks of C tokens of one (batch, head, value tile) with the
f32 state [d_k, block_v] resident in registers. Two forward designs
(sparsejax/linear/vjp.py has the split algebra):

  fused   _fused_kernel: the whole sequence, one program per (batch, head,
          value tile): q, k, v read once, o written once (the HBM floor,
          1024 B/token/head at d = e = 128 in bf16). Value tiles of 32-64
          columns give batch * heads * e / block_v programs, enough to fill
          the GPU from batch * heads = 32 (the sibling tiles share their q, k
          reads through L2; q k^T is recomputed per tile). It also stores
          the state entering every split of the backward (`s_in`, 64 KB per
          split and head), so the backward keeps its own split count.
  split   for too few (batch, head) pairs: _state_kernel (splits 0..NS-2:
          own state, reads k, v), XLA (the state entering each split),
          _out_kernel per split (1536 B/token/head in all).

  backward  _dgrad_kernel   splits 1..NS-1: own start gradient (reads q, do)
            (XLA)           the gradient entering each split at its end
            _dq_kernel      forward walk from s_in; also <q_t, dq_t> in f32
            _dkv_kernel     backward walk; the first split writes dS0; also
                            <k_t, dk_t> in f32 (the slope gradient's
                            identity needs both unrounded, vjp.slope_grad)

The state and gradient passes need no running decay: each token's weight to
its split's end (start) is an exp of a non-positive exponent, so they are
plain accumulations (acc += dot) that Triton pipelines. The per-chunk math
is `sparsejax.linear.chunk_math`, shared with the TPU kernel; the definition
it must match is `sparsejax.linear.reference.lightning_recurrence`.

Head dims are zero-padded to powers of two >= 16 (Triton array sizes; exact:
zero columns add nothing), lengths to splits * split with zero tokens.
`lightning_attention` and `decode` (bottom) are the entries the registry
loads.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from sparsejax.block_sparse.block_mask import next_power_of_2
from sparsejax.linear import chunk_math as cm
from sparsejax.linear import vjp

_F32 = jnp.float32
_DTYPES = tuple(map(jnp.dtype, (jnp.float32, jnp.bfloat16, jnp.float16)))
MAX_HEAD_DIM = 256


FORWARDS = ("auto", "fused", "split")


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Forward design, split count, value tiles, warps and stages.

  None picks a default (`resolved`, per problem):
  - forward "auto": "fused" when batch * heads * d_v / forward_block_v
    programs fill at least `fill` of the GPU's `num_sms` for a value tile of
    64 or 32 columns (the larger that does), else "split" (sequence splits:
    the two-pass forward).
  - forward_block_v: the forward's value tile (split forward: block_v).
  - num_splits: the backward's splits (and the split forward's), from a
    wave model (`vjp.choose_splits`).
  - block_v (backward) = min(d_v, 128), or 64 when d_k > 128 (registers:
    the state tile is d_k x block_v f32).
  - num_warps: forward tiles of <= 64 columns 4 (one warpgroup: its 64-row
    dots are not duplicated over a second one), else 8; the backward 8 for
    d_k x block_v >= 128 x 64 state tiles (4 below).
  - num_stages (16-bit inputs; 1 for f32: IEEE f32 dots do not use the
    tensor cores and are slow): forward tiles of <= 64 columns 3 when the
    programs fit in one wave, else 2 (at 4 warps two programs then share an
    SM: d_k 128 x 64 columns uses 253 registers and 88 KB); otherwise 3 (2
    at d_k 256), the dk/dv kernel too (it streams q, k, v, do: 212 KB at
    128 x 128 and 3 stages, which the H200 ran 7% faster than 2).
  - decode_block_v 32, decode_num_warps 4 (see `decode`).
  `benchmarks/linear/triton_resources.py` reports registers, spills and
  shared memory of these defaults compiled for sm90 (Triton 3.9, on CPU).
  """
  forward: str = "auto"
  num_splits: Optional[int] = None
  block_v: Optional[int] = None
  forward_block_v: Optional[int] = None
  num_warps: Optional[int] = None
  num_stages: Optional[int] = None
  num_stages_dkv: Optional[int] = None
  num_sms: int = 132  # H100 / H200
  fill: float = 0.85
  min_chunks_per_split: int = 8
  decode_block_v: Optional[int] = None
  decode_num_warps: Optional[int] = None
  # Filled by `resolved`: the forward kernel's (warps, stages).
  forward_params: Optional[tuple] = None

  def __post_init__(self):
    if self.forward not in FORWARDS:
      raise ValueError(f"forward must be one of {FORWARDS}, got "
                       f"{self.forward!r}")
    for name in ("num_splits", "num_warps", "num_stages", "num_stages_dkv",
                 "decode_num_warps"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"{name} must be None or a positive int, got {v!r}")
    for name in ("num_warps", "decode_num_warps"):
      v = getattr(self, name)
      if v is not None and (v & (v - 1) or v > 16):
        raise ValueError(f"{name} must be a power of two <= 16, got {v}")
    for name in ("block_v", "forward_block_v", "decode_block_v"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 16 or v & (v - 1)
                            or v > 256):
        raise ValueError(f"{name} must be None or a power of two in "
                         f"[16, 256], got {v!r}")
    if self.num_sms < 1 or self.min_chunks_per_split < 1:
      raise ValueError("num_sms and min_chunks_per_split must be >= 1")
    if not 0.0 < self.fill <= 1.0:
      raise ValueError(f"fill must be in (0, 1], got {self.fill!r}")

  def resolved(self, dp: int, ep: int, dtype, pairs: int,
               num_chunks: int, chunk: int) -> "TuningConfig":
    """A copy with the per-problem defaults filled in (for a Plan).

    pairs: batch * heads; num_chunks: chunks of the sequence.
    """
    f32 = jnp.dtype(dtype).itemsize == 4
    bv = min(self.block_v or (128 if dp <= 128 else 64), ep)
    stages = self.num_stages or (1 if f32 else 3 if dp <= 128 else 2)
    dkv = self.num_stages_dkv or stages
    programs = lambda tile: pairs * (ep // tile)
    forward, fbv = self.forward, self.forward_block_v
    if forward == "auto":
      tile = fbv or min(64, ep)
      while (fbv is None and tile > 32
             and programs(tile) < self.fill * self.num_sms):
        tile //= 2
      fused = programs(tile) >= self.fill * self.num_sms
      forward, fbv = ("fused", tile) if fused else ("split", fbv)
    if fbv is None:
      fbv = min(64, ep) if forward == "fused" else bv
      while (forward == "fused" and fbv > 32
             and programs(fbv) < self.fill * self.num_sms):
        fbv //= 2
    fbv = min(fbv, ep)
    ns = self.num_splits or vjp.choose_splits(
        num_chunks, programs(bv), num_sms=self.num_sms,
        min_chunks_per_split=self.min_chunks_per_split,
        overhead_chunks=4.0 * dp * ep * 4 / (chunk * (2 * dp + 2 * ep)
                                             * jnp.dtype(dtype).itemsize))
    one_wave = programs(fbv) * (ns if forward == "split" else 1) <= (
        self.num_sms)
    small = dp * fbv <= 128 * 64
    fwd_warps = self.num_warps or (4 if small else 8)
    fwd_stages = self.num_stages or (
        1 if f32 else (3 if one_wave else 2) if small else stages)
    return dataclasses.replace(
        self, forward=forward, num_splits=ns, block_v=bv,
        forward_block_v=fbv, num_stages=stages, num_stages_dkv=dkv,
        forward_params=(fwd_warps, fwd_stages))


def _padded(d: int) -> int:
  return next_power_of_2(max(d, 16))


def unsupported(dtype, d_k: int, d_v: int, chunk: Optional[int],
                interpret: bool = False) -> Optional[str]:
  """Why the Triton kernel cannot run a problem, or None if it can."""
  del interpret  # the interpreter takes what the GPU takes
  if jnp.dtype(dtype) not in _DTYPES:
    return f"needs float32, bfloat16 or float16 inputs, got {jnp.dtype(dtype)}"
  if max(d_k, d_v) > MAX_HEAD_DIM:
    return (f"needs d_k, d_v <= {MAX_HEAD_DIM} (the state tile lives in "
            f"registers), got {d_k}, {d_v}")
  if chunk is not None and (chunk < 16 or chunk > 128 or chunk & (chunk - 1)):
    return f"needs chunk_size a power of two in [16, 128], got {chunk}"
  return None


def unsupported_decode(dtype, d_k: int, d_v: int) -> Optional[str]:
  return unsupported(dtype, d_k, d_v, None)


def _params(plan, dp, bv, stages=None):
  """The backward kernels' compiler settings."""
  t = plan.tuning
  warps = t.num_warps or (8 if dp * bv >= 128 * 64 else 4)
  return pltriton.CompilerParams(num_warps=warps,
                                 num_stages=stages or t.num_stages)


def _forward_params(plan):
  warps, stages = plan.tuning.forward_params
  return pltriton.CompilerParams(num_warps=warps, num_stages=stages)


def _ragged(plan) -> bool:
  return plan.seq_len != plan.padded_len


class _Decays:
  """A program's decay tiles (its head's slope is constant over the walk)."""

  def __init__(self, slope, plan, split):
    c = plan.chunk
    self.slope, self.c, self.plan = slope, c, plan
    self.base = split * plan.split  # first token of the split
    self.d_scaled = cm.intra_decay(slope, c, plan.scale)
    self.qd_scaled = cm.q_decay(slope, c, plan.scale)
    self.kd_full = cm.k_decay(slope, c, c - 1)
    self.cd_full = cm.chunk_decay(slope, c, c - 1)

  def tail(self, n, exact: bool):
    """(kd, cd) of chunk n; exact: honour the true end T-1 (state outputs)."""
    if not (exact and _ragged(self.plan)):
      return self.kd_full, self.cd_full
    last = self.plan.seq_len - 1 - (self.base + n * self.c)
    return (cm.k_decay(self.slope, self.c, last),
            cm.chunk_decay(self.slope, self.c, last))

  def chunks(self, n):
    """lam^(C n): the decay across n whole chunks (n >= 0)."""
    return jnp.exp(-self.slope * (self.c * n).astype(_F32))


def _rows(n, c):
  return pl.ds(pl.multiple_of(n * c, c), c)


# --- forward -----------------------------------------------------------------


def _state_kernel(slope_ref, k_ref, v_ref, ds_ref, *, plan):
  """A split's own state: sum_j lam^(L-1-j) k_j^T v_j (a plain
  accumulation: token j's weight to the split's end, exponent <= 0)."""
  dec = _Decays(slope_ref[...], plan, pl.program_id(0))
  c, cps = plan.chunk, plan.chunks_per_split

  def body(n, acc):
    rows = _rows(n, c)
    w = dec.kd_full * dec.chunks(cps - 1 - n)
    return cm.state_step(acc, k_ref[rows, :], v_ref[rows, :], w, None,
                         decay_v=True)

  ds_ref[...] = jax.lax.fori_loop(0, cps, body, jnp.zeros(ds_ref.shape, _F32))


def _walk_out(dec, q_ref, k_ref, v_ref, o_ref, state, num_chunks, exact,
              at_chunk=None):
  """o for chunks [0, num_chunks) from `state`; returns the state after."""
  c = dec.c

  def body(n, state):
    if at_chunk is not None:
      at_chunk(n, state)
    rows = _rows(n, c)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    o_ref[rows, :] = cm.output(q, k, v, state, dec.d_scaled,
                               dec.qd_scaled).astype(o_ref.dtype)
    kd, cd = dec.tail(n, exact)
    return cm.state_step(state, k, v, kd, cd, decay_v=True)

  return jax.lax.fori_loop(0, num_chunks, body, state)


def _out_kernel(slope_ref, q_ref, k_ref, v_ref, sin_ref, o_ref, *final_ref,
                plan):
  """The split forward's output pass: split program_id(0) from S_in."""
  split = pl.program_id(0)
  dec = _Decays(slope_ref[...], plan, split)
  state = _walk_out(dec, q_ref, k_ref, v_ref, o_ref, sin_ref[...],
                    plan.chunks_per_split, bool(final_ref))
  if final_ref:
    @pl.when(split == plan.num_splits - 1)
    def _():
      final_ref[0][...] = state


def _fused_kernel(slope_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, sin_ref,
                  *final_ref, plan):
  """The fused forward: the whole sequence from S0, storing the state
  entering each of the backward's splits."""
  dec = _Decays(slope_ref[...], plan, 0)
  cps = plan.chunks_per_split
  s0 = s0_ref[...]
  at_chunk = None
  if plan.num_splits == 1:
    sin_ref[0] = s0
  else:
    def at_chunk(n, state):  # lax.rem/div: n >= 0 (jnp's floor forms
      @pl.when(jax.lax.rem(n, cps) == 0)  # do not lower to Triton)
      def _():
        sin_ref[jax.lax.div(n, cps)] = state
  real_chunks = -(-plan.seq_len // plan.chunk)  # padding chunks: no work
  state = _walk_out(dec, q_ref, k_ref, v_ref, o_ref, s0, real_chunks,
                    bool(final_ref), at_chunk)
  if final_ref:
    final_ref[0][...] = state


def _specs(plan, dp, bv, split_of=lambda s: s):
  """BlockSpecs over grid (split, head, batch, value tile)."""
  big_l = plan.split
  sq = lambda s, h, b, j: (b, split_of(s), h, 0)
  sv = lambda s, h, b, j: (b, split_of(s), h, j)
  return dict(
      slope=pl.BlockSpec((None,), lambda s, h, b, j: (h,)),
      qk=pl.BlockSpec((None, big_l, None, dp), sq),
      v=pl.BlockSpec((None, big_l, None, bv), sv),
      state=pl.BlockSpec((None, None, None, dp, bv),
                         lambda s, h, b, j: (b, s, h, 0, j)),
      head_state=pl.BlockSpec((None, None, dp, bv),
                              lambda s, h, b, j: (b, h, 0, j)),
      partial=pl.BlockSpec((None, None, big_l, None, dp),
                           lambda s, h, b, j: (j, b, split_of(s), h, 0)),
      rowdot=pl.BlockSpec((None, None, None, big_l),
                          lambda s, h, b, j: (j, b, h, s)))


def _fused_forward(q, k, v, slopes, s0, plan):
  """Grid (value tile, head, batch): the sibling tiles of a (batch, head)
  are launched together (axis 0 is CUDA's fastest), sharing q, k in L2."""
  b, tp, h, dp = q.shape
  ep = v.shape[-1]
  bv = plan.tuning.forward_block_v
  ns = plan.num_splits
  seq = lambda j, h, b: (b, 0, h, 0)
  tile = lambda j, h, b: (b, 0, h, j)
  head_state = pl.BlockSpec((None, None, dp, bv), lambda j, h, b: (b, h, 0, j))
  out_specs = [pl.BlockSpec((None, tp, None, bv), tile),
               pl.BlockSpec((None, ns, None, dp, bv),
                            lambda j, h, b: (b, 0, h, 0, j))]
  out_shape = [jax.ShapeDtypeStruct(v.shape, q.dtype),
               jax.ShapeDtypeStruct((b, ns, h, dp, ep), _F32)]
  if plan.want_final_state:
    out_specs.append(head_state)
    out_shape.append(jax.ShapeDtypeStruct((b, h, dp, ep), _F32))
  outs = pl.pallas_call(
      functools.partial(_fused_kernel, plan=plan),
      grid=(ep // bv, h, b),
      in_specs=[pl.BlockSpec((None,), lambda j, h, b: (h,)),
                pl.BlockSpec((None, tp, None, dp), seq),
                pl.BlockSpec((None, tp, None, dp), seq),
                pl.BlockSpec((None, tp, None, bv), tile), head_state],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=_forward_params(plan), interpret=plan.interpret,
      name="sparsejax_lightning_fused",
  )(slopes, q, k, v, s0)
  return outs[0], (outs[2] if plan.want_final_state else None), outs[1]


def forward(q, k, v, slopes, s0, plan):
  if plan.tuning.forward == "fused":
    return _fused_forward(q, k, v, slopes, s0, plan)
  b, tp, h, dp = q.shape
  ep = v.shape[-1]
  bv = plan.tuning.forward_block_v
  nv, ns = ep // bv, plan.num_splits
  sp = _specs(plan, dp, bv)
  local = None
  if ns > 1:
    local = pl.pallas_call(
        functools.partial(_state_kernel, plan=plan),
        grid=(ns - 1, h, b, nv),
        in_specs=[sp["slope"], sp["qk"], sp["v"]],
        out_specs=sp["state"],
        out_shape=jax.ShapeDtypeStruct((b, ns - 1, h, dp, ep), _F32),
        compiler_params=_forward_params(plan), interpret=plan.interpret,
        name="sparsejax_lightning_states",
    )(slopes, k, v)
  s_in = vjp.entering_states(local, slopes, s0, plan)
  out_specs = [sp["v"]]
  out_shape = [jax.ShapeDtypeStruct(v.shape, q.dtype)]
  if plan.want_final_state:
    out_specs.append(sp["head_state"])
    out_shape.append(jax.ShapeDtypeStruct((b, h, dp, ep), _F32))
  outs = pl.pallas_call(
      functools.partial(_out_kernel, plan=plan),
      grid=(ns, h, b, nv),
      in_specs=[sp["slope"], sp["qk"], sp["qk"], sp["v"], sp["state"]],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=_forward_params(plan), interpret=plan.interpret,
      name="sparsejax_lightning_fwd",
  )(slopes, q, k, v, s_in)
  return outs[0], (outs[1] if plan.want_final_state else None), s_in


# --- backward ----------------------------------------------------------------


def _dgrad_kernel(slope_ref, q_ref, do_ref, dg_ref, *, plan):
  """A split's own start gradient: sum_i scale lam^(i-start+1) q_i^T do_i
  (a plain accumulation, exponents <= 0)."""
  dec = _Decays(slope_ref[...], plan, pl.program_id(0) + 1)
  c, cps = plan.chunk, plan.chunks_per_split

  def body(n, acc):
    rows = _rows(n, c)
    w = dec.qd_scaled * dec.chunks(n)
    return cm.grad_state_step(acc, q_ref[rows, :], do_ref[rows, :], w, None,
                              decay_do=True)

  dg_ref[...] = jax.lax.fori_loop(0, cps, body, jnp.zeros(dg_ref.shape, _F32))


def _rowdot(a, b):
  """<a_t, b_t> per row in f32 (b: the kernel's f32 gradient tile)."""
  return jnp.sum(a.astype(_F32) * b, axis=1)


def _dq_kernel(slope_ref, q_ref, k_ref, v_ref, do_ref, sin_ref, dq_ref, u_ref,
               *, plan):
  dec = _Decays(slope_ref[...], plan, pl.program_id(0))
  c = plan.chunk

  def body(n, state):
    rows = _rows(n, c)
    k, v = k_ref[rows, :], v_ref[rows, :]
    dq = cm.grad_q(do_ref[rows, :], k, v, state, dec.d_scaled, dec.qd_scaled)
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    u_ref[rows] = _rowdot(q_ref[rows, :], dq)
    return cm.state_step(state, k, v, dec.kd_full, dec.cd_full, decay_v=True)

  jax.lax.fori_loop(0, plan.chunks_per_split, body, sin_ref[...])


def _dkv_kernel(slope_ref, q_ref, k_ref, v_ref, do_ref, gin_ref, dk_ref,
                dv_ref, w_ref, *ds0_ref, plan):
  split = pl.program_id(0)
  dec = _Decays(slope_ref[...], plan, split)
  c, cps = plan.chunk, plan.chunks_per_split

  def body(i, grad):
    n = cps - 1 - i
    rows = _rows(n, c)
    q, do = q_ref[rows, :], do_ref[rows, :]
    kd, cd = dec.tail(n, exact=True)
    # dv, then dk: each stored before the next is formed (registers).
    dv_ref[rows, :] = cm.grad_v(q, k_ref[rows, :], do, grad, dec.d_scaled,
                                kd).astype(dv_ref.dtype)
    dk = cm.grad_k(q, v_ref[rows, :], do, grad, dec.d_scaled, kd)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    w_ref[rows] = _rowdot(k_ref[rows, :], dk)
    return cm.grad_state_step(grad, q, do, dec.qd_scaled, cd)

  grad = jax.lax.fori_loop(0, cps, body, gin_ref[...])
  if ds0_ref:
    @pl.when(split == 0)
    def _():
      ds0_ref[0][...] = grad


def backward(q, k, v, slopes, s0, s_in, do, ds_final, plan):
  b, tp, h, dp = q.shape
  ep = v.shape[-1]
  bv = plan.tuning.block_v
  nv, ns = ep // bv, plan.num_splits
  do = do.astype(q.dtype)
  params = _params(plan, dp, bv)
  local = None
  if ns > 1:
    sp = _specs(plan, dp, bv, split_of=lambda s: s + 1)
    local = pl.pallas_call(
        functools.partial(_dgrad_kernel, plan=plan),
        grid=(ns - 1, h, b, nv),
        in_specs=[sp["slope"], sp["qk"], sp["v"]],
        out_specs=sp["state"],
        out_shape=jax.ShapeDtypeStruct((b, ns - 1, h, dp, ep), _F32),
        compiler_params=params, interpret=plan.interpret,
        name="sparsejax_lightning_dgrad",
    )(slopes, q, do)
  g_in = vjp.entering_grads(local, slopes, ds_final, plan)

  sp = _specs(plan, dp, bv)
  # One value tile: dq, dk are complete per program; several: f32 partials
  # over the tiles, summed here (the row dots likewise).
  if nv == 1:
    qk_out, qk_shape = sp["qk"], jax.ShapeDtypeStruct(q.shape, q.dtype)
  else:
    qk_out, qk_shape = sp["partial"], jax.ShapeDtypeStruct((nv,) + q.shape,
                                                           _F32)
  row_shape = jax.ShapeDtypeStruct((nv, b, h, tp), _F32)
  dq, u = pl.pallas_call(
      functools.partial(_dq_kernel, plan=plan),
      grid=(ns, h, b, nv),
      in_specs=[sp["slope"], sp["qk"], sp["qk"], sp["v"], sp["v"],
                sp["state"]],
      out_specs=[qk_out, sp["rowdot"]], out_shape=[qk_shape, row_shape],
      compiler_params=params, interpret=plan.interpret,
      name="sparsejax_lightning_dq",
  )(slopes, q, k, v, do, s_in)

  out_specs = [qk_out, sp["v"], sp["rowdot"]]
  out_shape = [qk_shape, jax.ShapeDtypeStruct(v.shape, v.dtype), row_shape]
  if plan.has_initial_state:
    out_specs.append(sp["head_state"])
    out_shape.append(jax.ShapeDtypeStruct(s0.shape, _F32))
  outs = pl.pallas_call(
      functools.partial(_dkv_kernel, plan=plan),
      grid=(ns, h, b, nv),
      in_specs=[sp["slope"], sp["qk"], sp["qk"], sp["v"], sp["v"],
                sp["state"]],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(plan, dp, bv, plan.tuning.num_stages_dkv),
      interpret=plan.interpret, name="sparsejax_lightning_dkv",
  )(slopes, q, k, v, do, g_in)
  dk, dv, w = outs[:3]
  if nv > 1:
    dq, dk = dq.sum(0).astype(q.dtype), dk.sum(0).astype(k.dtype)
  ds0 = outs[3] if plan.has_initial_state else jnp.zeros(s0.shape, _F32)
  return dq, dk, dv, ds0, (u, w)


_lightning = vjp.make_vjp(forward, backward)


def lightning_attention(q, k, v, slopes, initial_state, *, scale,
                        chunk_size=None, return_final_state=False,
                        interpret=False, tuning=None):
  """Registry entry: pads, plans the splits and runs the custom_vjp."""
  reason = unsupported(q.dtype, q.shape[-1], v.shape[-1], chunk_size)
  if reason is not None:
    raise ValueError(f"impl='pallas_triton' {reason}")
  if tuning is not None and not isinstance(tuning, TuningConfig):
    raise ValueError(f"tuning for impl='pallas_triton' must be a "
                     f"pallas_kernels.gpu.lightning_attention.TuningConfig, "
                     f"got {type(tuning).__name__}")
  b, t, h, d = q.shape
  e = v.shape[-1]
  dp, ep = _padded(d), _padded(e)
  c = chunk_size or 64
  tuning = (tuning or TuningConfig()).resolved(dp, ep, q.dtype, b * h,
                                               -(-t // c), c)
  plan = vjp.make_plan(t, c, tuning.num_splits, scale=scale,
                       has_initial_state=initial_state is not None,
                       want_final_state=return_final_state,
                       interpret=interpret, tuning=tuning)
  tp = plan.padded_len
  pad = lambda x, dim: vjp.pad_to(vjp.pad_to(x, 1, tp), 3, dim)
  s0 = (jnp.zeros((b, h, dp, ep), _F32) if initial_state is None else
        vjp.pad_to(vjp.pad_to(initial_state.astype(_F32), 2, dp), 3, ep))
  o, final = _lightning(pad(q, dp), pad(k, dp), pad(v, ep),
                        slopes.astype(_F32), s0, plan)
  o = o[:, :t, :, :e]
  return o, (final[:, :, :d, :e] if return_final_state else None)


# --- decode ------------------------------------------------------------------


def _decode_kernel(slope_ref, q_ref, k_ref, v_ref, s_ref, o_ref, new_ref, *,
                   scale):
  # q, k, v are 1-D blocks expanded here: Triton then lays them out after
  # the state tile (no shared-memory conversion of the tile for the sum).
  lam = jnp.exp(-slope_ref[...])
  col = lambda ref: ref[...].astype(_F32)[:, None]
  new = lam * s_ref[...] + col(k_ref) * v_ref[...].astype(_F32)[None, :]
  new_ref[...] = new
  o_ref[...] = scale * jnp.sum(col(q_ref) * new, axis=0)


def decode(q, k, v, state, slopes, *, scale, interpret=False, tuning=None):
  """Registry entry: one token; the state is read and written once.

  Grid (value tile, head, batch), tiles [d_k, 32] f32 (16 KB: 32 registers
  a thread at 4 warps, so many programs share an SM and keep enough loads in
  flight to stream the state at HBM speed); the state is updated in place
  when the caller donates it (input_output_aliases), else XLA copies it
  first.
  """
  reason = unsupported_decode(q.dtype, q.shape[-1], v.shape[-1])
  if reason is not None:
    raise ValueError(f"impl='pallas_triton' {reason}")
  tuning = tuning or TuningConfig()
  b, h, d = q.shape
  e = v.shape[-1]
  dp, ep = _padded(d), _padded(e)
  bv = min(tuning.decode_block_v or 32, ep)
  warps = tuning.decode_num_warps or 4
  sp = vjp.pad_to(vjp.pad_to(state.astype(_F32), 2, dp), 3, ep)
  vec = pl.BlockSpec((None, None, dp), lambda n, j, i: (i, j, 0))
  row = pl.BlockSpec((None, None, bv), lambda n, j, i: (i, j, n))
  tile = pl.BlockSpec((None, None, dp, bv), lambda n, j, i: (i, j, 0, n))
  o, new = pl.pallas_call(
      functools.partial(_decode_kernel, scale=scale),
      grid=(ep // bv, h, b),
      in_specs=[pl.BlockSpec((None,), lambda n, j, i: (j,)), vec, vec, row,
                tile],
      out_specs=[row, tile],
      out_shape=[jax.ShapeDtypeStruct((b, h, ep), _F32),
                 jax.ShapeDtypeStruct((b, h, dp, ep), _F32)],
      input_output_aliases={4: 1},
      compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=1),
      interpret=interpret, name="sparsejax_lightning_decode",
  )(slopes.astype(_F32), vjp.pad_to(q, 2, dp), vjp.pad_to(k, 2, dp),
    vjp.pad_to(v, 2, ep), sp)
  return o[:, :, :e], new[:, :, :d, :e]
