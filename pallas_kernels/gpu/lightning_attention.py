"""Lightning Attention-2 for GPU: Pallas with the Triton lowering.

Two-pass design (sparsejax/linear/vjp.py): each sequence is cut into splits
of `split` tokens so that splits * batch * heads * value tiles programs run
at once, which keeps the GPU full at small batch * heads (fla's fused
sequential kernel runs only batch * heads programs; its chunk kernel writes
a state per 64 tokens). A program walks its split's chunks of C tokens with
the f32 state [d_k, block_v] resident in registers:

  forward   _state_kernel   splits 0..NS-2: own state (reads k, v)
            (XLA)           the state entering each split
            _out_kernel     every split: o (reads q, k, v, writes o; the last
                            split also writes the final state)
  backward  _dgrad_kernel   splits 1..NS-1: own start gradient (reads q, do)
            (XLA)           the gradient entering each split at its end
            _dq_kernel      forward walk from the saved entering states
            _dkv_kernel     backward walk; the first split writes dS0

At d = e = 128 (block_v = 128) the forward reads q, k, v once in the output
pass plus k, v in the state pass: 1536 B/token/head in bf16 against fla's
2560 (its per-chunk states). The per-chunk math is
`sparsejax.linear.chunk_math`, shared with the TPU kernel; the definition it
must match is `sparsejax.linear.reference.lightning_recurrence`.

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


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Split count, value tile, warps and stages.

  None picks a default: `num_splits` from a wave model of the GPU
  (`vjp.choose_splits` with `num_sms`), `block_v` = min(d_v, 128), or 64
  when d_k > 128 (registers: the state tile is d_k x block_v f32), warps 8
  for 128 x 128 state tiles (4 below), 3 pipeline stages for 16-bit inputs
  (2 at d_k 256, 1 for f32: IEEE f32 dots do not use the tensor cores and
  are slow). The dk/dv kernel streams four tiles (q, k, v, do) next to the
  state gradient: 2 stages at 128 x 128 state tiles. Resource use of these
  defaults, compiled for sm90 with Triton 3.9 on CPU (bf16, d = 128):
  forward 228 registers, 160 KB shared memory; dq 226, 160 KB; dk/dv 255
  (256 B spilled), 144 KB; the state passes 174, 96 KB.
  """
  num_splits: Optional[int] = None
  block_v: Optional[int] = None
  num_warps: Optional[int] = None
  num_stages: Optional[int] = None
  num_stages_dkv: Optional[int] = None
  num_sms: int = 132  # H100 / H200
  min_chunks_per_split: int = 8
  decode_block_v: Optional[int] = None  # None: enough programs to fill SMs

  def __post_init__(self):
    for name in ("num_splits", "num_warps", "num_stages", "num_stages_dkv"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"{name} must be None or a positive int, got {v!r}")
    if self.num_warps is not None and (self.num_warps & (self.num_warps - 1)
                                       or self.num_warps > 16):
      raise ValueError(f"num_warps must be a power of two <= 16, got "
                       f"{self.num_warps}")
    for name in ("block_v", "decode_block_v"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 16 or v & (v - 1)
                            or v > 256):
        raise ValueError(f"{name} must be None or a power of two in "
                         f"[16, 256], got {v!r}")
    if self.num_sms < 1 or self.min_chunks_per_split < 1:
      raise ValueError("num_sms and min_chunks_per_split must be >= 1")

  def resolved(self, dp: int, ep: int, dtype) -> "TuningConfig":
    """A copy with the per-problem defaults filled in (for a Plan)."""
    bv = min(self.block_v or (128 if dp <= 128 else 64), ep)
    warps = self.num_warps or (8 if dp * bv >= 128 * 64 else 4)
    stages = self.num_stages or (
        1 if jnp.dtype(dtype).itemsize == 4 else 3 if dp <= 128 else 2)
    dkv = self.num_stages_dkv or (min(stages, 2) if dp * bv >= 128 * 128
                                  else stages)
    return dataclasses.replace(self, block_v=bv, num_warps=warps,
                               num_stages=stages, num_stages_dkv=dkv)


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


def _params(plan, stages=None):
  t = plan.tuning
  return pltriton.CompilerParams(num_warps=t.num_warps,
                                 num_stages=stages or t.num_stages)


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


def _rows(n, c):
  return pl.ds(pl.multiple_of(n * c, c), c)


# --- forward -----------------------------------------------------------------


def _state_kernel(slope_ref, k_ref, v_ref, ds_ref, *, plan):
  dec = _Decays(slope_ref[...], plan, pl.program_id(0))
  c = plan.chunk

  def body(n, state):
    rows = _rows(n, c)
    return cm.state_step(state, k_ref[rows, :], v_ref[rows, :], dec.kd_full,
                         dec.cd_full)

  ds_ref[...] = jax.lax.fori_loop(0, plan.chunks_per_split, body,
                                  jnp.zeros(ds_ref.shape, _F32))


def _out_kernel(slope_ref, q_ref, k_ref, v_ref, sin_ref, o_ref, *final_ref,
                plan):
  split = pl.program_id(0)
  dec = _Decays(slope_ref[...], plan, split)
  c = plan.chunk

  def body(n, state):
    rows = _rows(n, c)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    o_ref[rows, :] = cm.output(q, k, v, state, dec.d_scaled,
                               dec.qd_scaled).astype(o_ref.dtype)
    kd, cd = dec.tail(n, exact=bool(final_ref))
    return cm.state_step(state, k, v, kd, cd)

  state = jax.lax.fori_loop(0, plan.chunks_per_split, body, sin_ref[...])
  if final_ref:
    @pl.when(split == plan.num_splits - 1)
    def _():
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
                           lambda s, h, b, j: (j, b, split_of(s), h, 0)))


def forward(q, k, v, slopes, s0, plan):
  b, tp, h, dp = q.shape
  ep = v.shape[-1]
  bv = plan.tuning.block_v
  nv, ns = ep // bv, plan.num_splits
  local = None
  if ns > 1:
    sp = _specs(plan, dp, bv)
    local = pl.pallas_call(
        functools.partial(_state_kernel, plan=plan),
        grid=(ns - 1, h, b, nv),
        in_specs=[sp["slope"], sp["qk"], sp["v"]],
        out_specs=sp["state"],
        out_shape=jax.ShapeDtypeStruct((b, ns - 1, h, dp, ep), _F32),
        compiler_params=_params(plan), interpret=plan.interpret,
        name="sparsejax_lightning_states",
    )(slopes, k, v)
  s_in = vjp.entering_states(local, slopes, s0, plan)
  sp = _specs(plan, dp, bv)
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
      compiler_params=_params(plan), interpret=plan.interpret,
      name="sparsejax_lightning_fwd",
  )(slopes, q, k, v, s_in)
  return outs[0], (outs[1] if plan.want_final_state else None), s_in


# --- backward ----------------------------------------------------------------


def _dgrad_kernel(slope_ref, q_ref, do_ref, dg_ref, *, plan):
  dec = _Decays(slope_ref[...], plan, pl.program_id(0) + 1)
  c, cps = plan.chunk, plan.chunks_per_split

  def body(i, grad):
    rows = _rows(cps - 1 - i, c)
    return cm.grad_state_step(grad, q_ref[rows, :], do_ref[rows, :],
                              dec.qd_scaled, dec.cd_full)

  dg_ref[...] = jax.lax.fori_loop(0, cps, body, jnp.zeros(dg_ref.shape, _F32))


def _dq_kernel(slope_ref, k_ref, v_ref, do_ref, sin_ref, dq_ref, *, plan):
  dec = _Decays(slope_ref[...], plan, pl.program_id(0))
  c = plan.chunk

  def body(n, state):
    rows = _rows(n, c)
    k, v = k_ref[rows, :], v_ref[rows, :]
    dq_ref[rows, :] = cm.grad_q(do_ref[rows, :], k, v, state, dec.d_scaled,
                                dec.qd_scaled).astype(dq_ref.dtype)
    return cm.state_step(state, k, v, dec.kd_full, dec.cd_full)

  jax.lax.fori_loop(0, plan.chunks_per_split, body, sin_ref[...])


def _dkv_kernel(slope_ref, q_ref, k_ref, v_ref, do_ref, gin_ref, dk_ref,
                dv_ref, *ds0_ref, plan):
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
    dk_ref[rows, :] = cm.grad_k(q, v_ref[rows, :], do, grad, dec.d_scaled,
                                kd).astype(dk_ref.dtype)
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
  params = _params(plan)
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
  # over the tiles, summed here.
  if nv == 1:
    qk_out, qk_shape = sp["qk"], jax.ShapeDtypeStruct(q.shape, q.dtype)
  else:
    qk_out, qk_shape = sp["partial"], jax.ShapeDtypeStruct((nv,) + q.shape,
                                                           _F32)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, plan=plan),
      grid=(ns, h, b, nv),
      in_specs=[sp["slope"], sp["qk"], sp["v"], sp["v"], sp["state"]],
      out_specs=qk_out, out_shape=qk_shape, compiler_params=params,
      interpret=plan.interpret, name="sparsejax_lightning_dq",
  )(slopes, k, v, do, s_in)

  out_specs = [qk_out, sp["v"]]
  out_shape = [qk_shape, jax.ShapeDtypeStruct(v.shape, v.dtype)]
  if plan.has_initial_state:
    out_specs.append(sp["head_state"])
    out_shape.append(jax.ShapeDtypeStruct(s0.shape, _F32))
  outs = pl.pallas_call(
      functools.partial(_dkv_kernel, plan=plan),
      grid=(ns, h, b, nv),
      in_specs=[sp["slope"], sp["qk"], sp["qk"], sp["v"], sp["v"],
                sp["state"]],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(plan, plan.tuning.num_stages_dkv),
      interpret=plan.interpret, name="sparsejax_lightning_dkv",
  )(slopes, q, k, v, do, g_in)
  dk, dv = outs[0], outs[1]
  if nv > 1:
    dq, dk = dq.sum(0).astype(q.dtype), dk.sum(0).astype(k.dtype)
  ds0 = outs[2] if plan.has_initial_state else jnp.zeros(s0.shape, _F32)
  return dq, dk, dv, ds0


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
  tuning = (tuning or TuningConfig()).resolved(dp, ep, q.dtype)
  c = chunk_size or 64
  num_chunks = -(-t // c)
  ns = tuning.num_splits or vjp.choose_splits(
      num_chunks, b * h * (ep // tuning.block_v), num_sms=tuning.num_sms,
      min_chunks_per_split=tuning.min_chunks_per_split,
      overhead_chunks=4.0 * dp * ep * 4 / (c * (2 * dp + 2 * ep)
                                           * q.dtype.itemsize))
  plan = vjp.make_plan(t, c, ns, scale=scale,
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
  lam = jnp.exp(-slope_ref[...])
  new = lam * s_ref[...] + (k_ref[...].astype(_F32) *
                            v_ref[...].astype(_F32))  # [dp, 1] x [1, bv]
  new_ref[...] = new
  o_ref[...] = scale * jnp.sum(q_ref[...].astype(_F32) * new, axis=0,
                               keepdims=True)


def decode(q, k, v, state, slopes, *, scale, interpret=False, tuning=None):
  """Registry entry: one token; grid (batch, head, value tile), the state
  updated in place when the caller donates it (input_output_aliases)."""
  reason = unsupported_decode(q.dtype, q.shape[-1], v.shape[-1])
  if reason is not None:
    raise ValueError(f"impl='pallas_triton' {reason}")
  tuning = tuning or TuningConfig()
  b, h, d = q.shape
  e = v.shape[-1]
  dp, ep = _padded(d), _padded(e)
  bv = tuning.decode_block_v
  if bv is None:  # >= 4 programs per SM, tiles of 32..128 columns
    bv = ep
    while bv > 32 and b * h * (ep // bv) < 4 * tuning.num_sms:
      bv //= 2
  bv = min(bv, ep)
  col = lambda x, dim: vjp.pad_to(x, 2, dim)[..., :, None]   # [B, H, dim, 1]
  row = lambda x, dim: vjp.pad_to(x, 2, dim)[..., None, :]   # [B, H, 1, dim]
  sp = vjp.pad_to(vjp.pad_to(state.astype(_F32), 2, dp), 3, ep)
  o, new = pl.pallas_call(
      functools.partial(_decode_kernel, scale=scale),
      grid=(b, h, ep // bv),
      in_specs=[pl.BlockSpec((None,), lambda i, j, n: (j,)),
                pl.BlockSpec((None, None, dp, 1), lambda i, j, n: (i, j, 0, 0)),
                pl.BlockSpec((None, None, dp, 1), lambda i, j, n: (i, j, 0, 0)),
                pl.BlockSpec((None, None, 1, bv), lambda i, j, n: (i, j, 0, n)),
                pl.BlockSpec((None, None, dp, bv),
                             lambda i, j, n: (i, j, 0, n))],
      out_specs=[pl.BlockSpec((None, None, 1, bv),
                              lambda i, j, n: (i, j, 0, n)),
                 pl.BlockSpec((None, None, dp, bv),
                              lambda i, j, n: (i, j, 0, n))],
      out_shape=[jax.ShapeDtypeStruct((b, h, 1, ep), _F32),
                 jax.ShapeDtypeStruct((b, h, dp, ep), _F32)],
      input_output_aliases={4: 1},
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret, name="sparsejax_lightning_decode",
  )(slopes.astype(_F32), col(q, dp), col(k, dp), row(v, ep), sp)
  return o[:, :, 0, :e], new[:, :, :d, :e]
