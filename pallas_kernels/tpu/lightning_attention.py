"""Lightning Attention-2 for TPU: Pallas with the Mosaic lowering.

The LA2 design (axlearn's SSD pattern): grid (batch, head, chunk) with the
chunk axis "arbitrary", the f32 state [d_k, d_v] resident in a VMEM scratch
across it, and the chunk tiles of q, k, v brought in by the BlockSpec
pipeline. A TPU has one or two TensorCores, so batch * heads programs keep
it busy and no sequence split is needed (unlike the GPU kernel).

  forward  chunk n: o from the state, then the state update; the state
           starts as S0 and is written out after the last chunk
  dq       the same forward walk, dq from the state entering each chunk
  dk, dv   the reverse walk (index maps read chunk NT-1-n) with the state
           gradient in VMEM, starting at dS_T; its value after chunk 0 is
           dS0

The per-chunk math is `sparsejax.linear.chunk_math` (shared with the Triton
kernel); the definition it must match is
`sparsejax.linear.reference.lightning_recurrence`. Slope gradients come from
the identity in `sparsejax.linear.vjp`.

Layout: q, k, v stay [B, T, H, D] viewed as [B, T, H * D] (free), so a
(chunk, D) tile of head h is block (b, n, h): on hardware D is zero-padded to
a multiple of 128 (lanes) and the chunk must be a multiple of 128 (it is the
lane dimension of the chunk's score tile); interpret mode takes any sizes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sparsejax.linear import chunk_math as cm
from sparsejax.linear import vjp

_F32 = jnp.float32
_DTYPES = tuple(map(jnp.dtype, (jnp.float32, jnp.bfloat16, jnp.float16)))
NUM_LANES = 128
DEFAULT_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Compiler settings of the TPU kernels."""
  # Split (batch, head) across megacore TensorCores ("parallel"); the chunk
  # axis is always "arbitrary" (the state is carried along it).
  megacore: bool = True
  vmem_limit_bytes: Optional[int] = None

  def __post_init__(self):
    if not isinstance(self.megacore, bool):
      raise ValueError(f"megacore must be a bool, got {self.megacore!r}")
    if self.vmem_limit_bytes is not None and (
        not isinstance(self.vmem_limit_bytes, int)
        or self.vmem_limit_bytes < (1 << 20)):
      raise ValueError(f"vmem_limit_bytes must be None or an int >= 1 MiB, "
                       f"got {self.vmem_limit_bytes!r}")

  def compiler_params(self, ndims: int) -> pltpu.CompilerParams:
    par = "parallel" if self.megacore else "arbitrary"
    return pltpu.CompilerParams(
        dimension_semantics=(par,) * (ndims - 1) + ("arbitrary",),
        vmem_limit_bytes=self.vmem_limit_bytes)


def unsupported(dtype, d_k: int, d_v: int, chunk: Optional[int],
                interpret: bool = False) -> Optional[str]:
  """Why the TPU kernel cannot run a problem, or None if it can."""
  del d_k, d_v  # padded to the lanes
  if jnp.dtype(dtype) not in _DTYPES:
    return f"needs float32, bfloat16 or float16 inputs, got {jnp.dtype(dtype)}"
  if chunk is not None and not interpret and chunk % NUM_LANES:
    return (f"needs chunk_size a multiple of {NUM_LANES} on a TPU (the lane "
            f"dimension of the score tile), got {chunk}")
  return None


def unsupported_decode(dtype, d_k: int, d_v: int) -> Optional[str]:
  return unsupported(dtype, d_k, d_v, None, True)


def _interpret_params(flag):
  if not flag:
    return False
  if isinstance(flag, pltpu.InterpretParams):
    return flag
  return pltpu.InterpretParams(detect_races=True)


def _kernel_dim(d: int, interpret) -> int:
  return d if interpret else -(-d // NUM_LANES) * NUM_LANES


def _view(x):
  """[B, T, H, D] -> [B, T, H * D] (a free reshape)."""
  b, t, h, d = x.shape
  return x.reshape(b, t, h * d)


def _unview(x, heads):
  b, t, _ = x.shape
  return x.reshape(b, t, heads, -1)


class _Walk:
  """One program's chunk walk: (batch, head, step) and the chunk it reads."""

  def __init__(self, plan, reverse: bool):
    self.plan, self.reverse = plan, reverse
    self.nt = plan.padded_len // plan.chunk

  def chunk(self, n):
    return self.nt - 1 - n if self.reverse else n

  def index(self):
    """(b, n, h) -> the block index of that step's (chunk, D) tile."""
    return lambda b, h, n: (b, self.chunk(n), h)

  def decays(self, slope_ref, exact):
    plan, c = self.plan, self.plan.chunk
    slope = slope_ref[pl.program_id(1)]
    n = self.chunk(pl.program_id(2))
    last = plan.seq_len - 1 - n * c if exact else c - 1
    return (slope, cm.intra_decay(slope, c, plan.scale),
            cm.q_decay(slope, c, plan.scale), cm.k_decay(slope, c, last),
            cm.chunk_decay(slope, c, last))


def _specs(plan, dk, dv, reverse=False):
  walk = _Walk(plan, reverse)
  c = plan.chunk
  return walk, dict(
      slopes=pl.BlockSpec(memory_space=pltpu.SMEM),
      qk=pl.BlockSpec((None, c, dk), walk.index()),
      v=pl.BlockSpec((None, c, dv), walk.index()),
      state=pl.BlockSpec((None, None, dk, dv), lambda b, h, n: (b, h, 0, 0)))


def _call(kernel, plan, grid, in_specs, out_specs, out_shape, scratch):
  tuning = plan.tuning
  return pl.pallas_call(
      kernel, out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=grid, in_specs=in_specs,
          out_specs=out_specs, scratch_shapes=scratch),
      compiler_params=tuning.compiler_params(len(grid)),
      interpret=_interpret_params(plan.interpret))


# --- forward -----------------------------------------------------------------


def _fwd_kernel(slopes_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, *rest, plan,
                walk):
  final_ref, state = (rest[0], rest[1]) if plan.want_final_state else (
      None, rest[0])
  n = pl.program_id(2)
  _, d_scaled, qd, kd, cd = walk.decays(slopes_ref, exact=True)

  @pl.when(n == 0)
  def _():
    state[...] = s0_ref[...]

  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  s = state[...]
  o_ref[...] = cm.output(q, k, v, s, d_scaled, qd).astype(o_ref.dtype)
  s = cm.state_step(s, k, v, kd, cd)
  state[...] = s
  if final_ref is not None:
    @pl.when(n == walk.nt - 1)
    def _():
      final_ref[...] = s


def forward(q, k, v, slopes, s0, plan):
  """On padded [B, Tp, H, D] inputs (viewed as [B, Tp, H * D] inside)."""
  b, tp, h, dk = q.shape
  dv = v.shape[-1]
  walk, sp = _specs(plan, dk, dv)
  out_specs = [sp["v"]]
  out_shape = [jax.ShapeDtypeStruct((b, tp, h * dv), q.dtype)]
  if plan.want_final_state:
    out_specs.append(sp["state"])
    out_shape.append(jax.ShapeDtypeStruct((b, h, dk, dv), _F32))
  outs = _call(functools.partial(_fwd_kernel, plan=plan, walk=walk), plan,
               (b, h, walk.nt),
               [sp["slopes"], sp["qk"], sp["qk"], sp["v"], sp["state"]],
               out_specs, out_shape, [pltpu.VMEM((dk, dv), _F32)],
               )(slopes, _view(q), _view(k), _view(v), s0)
  return (_unview(outs[0], h), (outs[1] if plan.want_final_state else None),
          None)


# --- backward ----------------------------------------------------------------


def _dq_kernel(slopes_ref, k_ref, v_ref, do_ref, s0_ref, dq_ref, state, *,
               plan, walk):
  _, d_scaled, qd, kd, cd = walk.decays(slopes_ref, exact=False)

  @pl.when(pl.program_id(2) == 0)
  def _():
    state[...] = s0_ref[...]

  k, v = k_ref[...], v_ref[...]
  s = state[...]
  dq_ref[...] = cm.grad_q(do_ref[...], k, v, s, d_scaled, qd).astype(
      dq_ref.dtype)
  state[...] = cm.state_step(s, k, v, kd, cd)


def _dkv_kernel(slopes_ref, q_ref, k_ref, v_ref, do_ref, dsf_ref, dk_ref,
                dv_ref, *rest, plan, walk):
  ds0_ref, grad = (rest[0], rest[1]) if plan.has_initial_state else (
      None, rest[0])
  n = pl.program_id(2)
  _, d_scaled, qd, kd, cd = walk.decays(slopes_ref, exact=True)

  @pl.when(n == 0)
  def _():
    grad[...] = dsf_ref[...]

  q, do = q_ref[...], do_ref[...]
  g = grad[...]
  dk, dv = cm.grad_kv(q, k_ref[...], v_ref[...], do, g, d_scaled, kd)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  g = cm.grad_state_step(g, q, do, qd, cd)
  grad[...] = g
  if ds0_ref is not None:
    @pl.when(n == walk.nt - 1)
    def _():
      ds0_ref[...] = g


def backward(q, k, v, slopes, s0, s_in, do, ds_final, plan):
  del s_in  # the walks recompute the states
  b, tp, h, dk = q.shape
  dv = v.shape[-1]
  q, k, v, do = map(_view, (q, k, v, do.astype(q.dtype)))
  walk, sp = _specs(plan, dk, dv)
  dq = _call(functools.partial(_dq_kernel, plan=plan, walk=walk), plan,
             (b, h, walk.nt),
             [sp["slopes"], sp["qk"], sp["v"], sp["v"], sp["state"]],
             sp["qk"], jax.ShapeDtypeStruct(q.shape, q.dtype),
             [pltpu.VMEM((dk, dv), _F32)])(slopes, k, v, do, s0)

  walk, sp = _specs(plan, dk, dv, reverse=True)
  out_specs = [sp["qk"], sp["v"]]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype),
               jax.ShapeDtypeStruct(v.shape, v.dtype)]
  if plan.has_initial_state:
    out_specs.append(sp["state"])
    out_shape.append(jax.ShapeDtypeStruct(s0.shape, _F32))
  outs = _call(functools.partial(_dkv_kernel, plan=plan, walk=walk), plan,
               (b, h, walk.nt),
               [sp["slopes"], sp["qk"], sp["qk"], sp["v"], sp["v"],
                sp["state"]],
               out_specs, out_shape, [pltpu.VMEM((dk, dv), _F32)],
               )(slopes, q, k, v, do, ds_final.astype(_F32))
  ds0 = outs[2] if plan.has_initial_state else jnp.zeros(s0.shape, _F32)
  # No row dots: the slope gradient uses the rounded dq, dk (vjp.slope_grad).
  return (_unview(dq, h), _unview(outs[0], h), _unview(outs[1], h), ds0,
          None)


_lightning = vjp.make_vjp(forward, backward)


def lightning_attention(q, k, v, slopes, initial_state, *, scale,
                        chunk_size=None, return_final_state=False,
                        interpret=False, tuning=None):
  """Registry entry: pads and views the inputs, runs the custom_vjp."""
  reason = unsupported(q.dtype, q.shape[-1], v.shape[-1],
                       chunk_size or DEFAULT_CHUNK, bool(interpret))
  if reason is not None:
    raise ValueError(f"impl='pallas_tpu' {reason}")
  if tuning is not None and not isinstance(tuning, TuningConfig):
    raise ValueError(f"tuning for impl='pallas_tpu' must be a "
                     f"pallas_kernels.tpu.lightning_attention.TuningConfig, "
                     f"got {type(tuning).__name__}")
  b, t, h, d = q.shape
  e = v.shape[-1]
  c = chunk_size or DEFAULT_CHUNK
  dk, dv = _kernel_dim(d, interpret), _kernel_dim(e, interpret)
  plan = vjp.make_plan(t, c, 1, scale=scale,
                       has_initial_state=initial_state is not None,
                       want_final_state=return_final_state,
                       interpret=interpret, tuning=tuning or TuningConfig())
  tp = plan.padded_len
  pad = lambda x, dim: vjp.pad_to(vjp.pad_to(x, 1, tp), 3, dim)
  s0 = (jnp.zeros((b, h, dk, dv), _F32) if initial_state is None else
        vjp.pad_to(vjp.pad_to(initial_state.astype(_F32), 2, dk), 3, dv))
  o, final = _lightning(pad(q, dk), pad(k, dk), pad(v, dv),
                        slopes.astype(_F32), s0, plan)
  o = o[:, :t, :, :e]
  return o, (final[:, :, :d, :e] if return_final_state else None)


# --- decode ------------------------------------------------------------------


def _decode_kernel(slopes_ref, q_ref, k_ref, v_ref, s_ref, o_ref, new_ref, *,
                   scale):
  lam = jnp.exp(-slopes_ref[pl.program_id(1)])
  new = lam * s_ref[...] + (k_ref[...].astype(_F32) *
                            v_ref[...].astype(_F32))  # [d, 1] x [1, e]
  new_ref[...] = new
  o_ref[...] = scale * jnp.sum(q_ref[...].astype(_F32) * new, axis=0,
                               keepdims=True)


def decode(q, k, v, state, slopes, *, scale, interpret=False, tuning=None):
  """Registry entry: grid (batch, head); the state is updated in place when
  the caller donates it. Every block spans its array's last two dims, so
  any head dims are legal on hardware."""
  del tuning
  b, h, d = q.shape
  e = v.shape[-1]
  col = lambda x: x[..., :, None]
  full = lambda *s: pl.BlockSpec((None, None) + s, lambda i, j: (i, j, 0, 0))
  o, new = pl.pallas_call(
      functools.partial(_decode_kernel, scale=scale),
      grid=(b, h),
      in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), full(d, 1),
                full(d, 1), full(1, e), full(d, e)],
      out_specs=[full(1, e), full(d, e)],
      out_shape=[jax.ShapeDtypeStruct((b, h, 1, e), _F32),
                 jax.ShapeDtypeStruct((b, h, d, e), _F32)],
      input_output_aliases={4: 1},
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel")),
      interpret=_interpret_params(interpret),
  )(slopes.astype(_F32), col(q), col(k), v[..., None, :],
    state.astype(_F32))
  return o[:, :, 0], new
