"""Batched window attention with a fused relative bias: Pallas on TPU.

XLA partitions the tokens window-major and heads-major, [H, B*nW, Tp, D],
zero-padding each window from T to Tp (a multiple of 8 sublanes); one grid
step owns `windows_per_program` windows of one head as a (G, Tp, D) block
(the last two dims are whole array dims, so any T and D tile legally). Each
window's [Tp, Tp] score tile gets the bias tile (f32, -inf on padded keys)
added in VMEM; the backward kernel computes dQ, dK, dV and sums dS over its
windows into one [Tp, Tp] block per step, reduced outside in a fixed order.

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
from jax.experimental.pallas import tpu as pltpu

from sparsejax.block_sparse import block_math
from sparsejax.vision import permute

SUBLANES = 8


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Windows per grid step (None: the largest divisor of the window count
  that keeps about 256 steps)."""
  windows_per_program: Optional[int] = None

  def __post_init__(self):
    w = self.windows_per_program
    if w is not None and (not isinstance(w, int) or w < 1):
      raise ValueError(f"windows_per_program must be a positive int, got "
                       f"{w!r}")


def _group(num_windows, heads, tuning):
  want = tuning.windows_per_program or max(1, num_windows * heads // 256)
  want = min(want, num_windows)
  return max(g for g in range(1, want + 1) if num_windows % g == 0)


def _interpret(flag):
  if not flag:
    return False
  return flag if isinstance(flag, pltpu.InterpretParams) else (
      pltpu.InterpretParams(detect_races=True))


def _dot(a, b, dims):
  return jax.lax.dot_general(a, b, (dims, ((), ())),
                             precision=block_math.dot_precision(a.dtype),
                             preferred_element_type=jnp.float32)


def _probs(q, k, bias, scale):
  s = _dot(q, k, ((1,), (1,))) * scale + bias
  p = jnp.exp(s - s.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def _fwd_kernel(q_ref, k_ref, v_ref, b_ref, o_ref, *, scale, group):
  def body(i, c):
    p = _probs(q_ref[i], k_ref[i], b_ref[...], scale)
    o_ref[i] = _dot(p.astype(v_ref.dtype), v_ref[i],
                    ((1,), (0,))).astype(o_ref.dtype)
    return c
  jax.lax.fori_loop(0, group, body, 0)


def _bwd_kernel(q_ref, k_ref, v_ref, do_ref, b_ref, dq_ref, dk_ref, dv_ref,
                db_ref, *, scale, group):
  def body(i, db):
    q, k, v, do = q_ref[i], k_ref[i], v_ref[i], do_ref[i]
    p = _probs(q, k, b_ref[...], scale)
    dp = _dot(do, v, ((1,), (1,)))
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))  # padded rows: do = 0
    dq_ref[i] = (_dot(ds.astype(k.dtype), k, ((1,), (0,))) * scale).astype(
        dq_ref.dtype)
    dk_ref[i] = (_dot(ds.astype(q.dtype), q, ((0,), (0,))) * scale).astype(
        dk_ref.dtype)
    dv_ref[i] = _dot(p.astype(do.dtype), do, ((0,), (0,))).astype(
        dv_ref.dtype)
    return db + ds
  db_ref[...] = jax.lax.fori_loop(0, group, body,
                                  jnp.zeros(db_ref.shape, jnp.float32))


def _specs(tp, d, group, bias):
  tile = pl.BlockSpec((None, group, tp, d), lambda h, g: (h, g, 0, 0))
  shared = bias.shape[0] == 1
  bspec = pl.BlockSpec((None, tp, tp), lambda h, g: (0 if shared else h, 0,
                                                     0))
  return tile, bspec


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, bias, scale, group, interpret):
  h, nw, tp, d = q.shape
  tile, bspec = _specs(tp, d, group, bias)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, group=group),
      grid=(h, nw // group), in_specs=[tile, tile, tile, bspec],
      out_specs=tile, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel")),
      interpret=_interpret(interpret),
      name="sparsejax_window_attention_fwd_tpu")(q, k, v, bias)


def _fwd(q, k, v, bias, scale, group, interpret):
  return _attention(q, k, v, bias, scale, group, interpret), (q, k, v, bias)


def _bwd(scale, group, interpret, res, do):
  q, k, v, bias = res
  h, nw, tp, d = q.shape
  tile, bspec = _specs(tp, d, group, bias)
  steps = nw // group
  dq, dk, dv, db = pl.pallas_call(
      functools.partial(_bwd_kernel, scale=scale, group=group),
      grid=(h, steps), in_specs=[tile, tile, tile, tile, bspec],
      out_specs=[tile, tile, tile,
                 pl.BlockSpec((None, None, tp, tp), lambda hh, g: (hh, g, 0,
                                                                   0))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] * 3
      + [jax.ShapeDtypeStruct((h, steps, tp, tp), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel")),
      interpret=_interpret(interpret),
      name="sparsejax_window_attention_bwd_tpu",
  )(q, k, v, do.astype(q.dtype), bias)
  db = db.sum(1)  # fixed-order reduction over steps
  if bias.shape[0] == 1:
    db = db.sum(0, keepdims=True)
  return dq, dk, dv, db


_attention.defvjp(_fwd, _bwd)

_PARTITION = {"block": (permute.window_partition, permute.window_unpartition),
              "grid": (permute.grid_partition, permute.grid_unpartition)}


def window_attention(q, k, v, layout, bias, scale, *, interpret=False,
                     tuning=None):
  """q, k, v: [B, X, Y, H, D] (block/grid) or [B, nW, T, H, D]; bias
  [H|1, T, T] f32 or None. Output in q's layout and dtype."""
  tuning = tuning or TuningConfig()
  if not isinstance(tuning, TuningConfig):
    raise ValueError(f"tuning for the TPU window kernel must be a "
                     f"pallas_kernels.tpu.window_attention.TuningConfig, got "
                     f"{type(tuning).__name__}")
  if layout.kind != "contiguous":
    part, unpart = _PARTITION[layout.kind]
    q, k, v = (part(x, layout.window) for x in (q, k, v))
  b, nw, t, h, d = q.shape
  tp = -(-t // SUBLANES) * SUBLANES

  def heads_major(x):  # [B, nW, T, H, D] -> [H, B*nW, Tp, D]
    x = jnp.pad(x, ((0, 0), (0, 0), (0, tp - t), (0, 0), (0, 0)))
    return jnp.transpose(x, (3, 0, 1, 2, 4)).reshape(h, b * nw, tp, d)

  if bias is None:
    bias = jax.lax.stop_gradient(jnp.zeros((1, t, t), jnp.float32))
  bias = jnp.pad(bias.astype(jnp.float32), ((0, 0), (0, tp - t), (0, 0)))
  bias = jnp.pad(bias, ((0, 0), (0, 0), (0, tp - t)),
                 constant_values=-jnp.inf)
  group = _group(b * nw, h, tuning)
  out = _attention(heads_major(q), heads_major(k), heads_major(v), bias,
                   float(scale), group, interpret)
  out = jnp.transpose(out.reshape(h, b, nw, tp, d), (1, 2, 3, 0, 4))[:, :, :t]
  if layout.kind != "contiguous":
    out = unpart(out, layout.window, layout.map_shape)
  return out
