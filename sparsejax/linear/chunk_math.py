"""Per-chunk Lightning Attention-2 math shared by the Pallas kernels.

The functions act on values of one chunk of C tokens of one (batch, head)
(q, k [C, d_k], v, do [C, d_v], a state S or a state gradient G [d_k, d_v] in
float32) and a scalar slope s, so the Triton and TPU kernels run literally
the same arithmetic. With lam = exp(-s), positions i, j in the chunk and the
state S entering the chunk (the state after the previous token):

  o   = scale * ((q k^T) * D) v + scale * lam^(i+1) * (q S)   D_ij = lam^(i-j)
  S'  = lam^C S + (lam^(C-1-j) * k)^T v

Backward, with G the gradient entering the chunk at its last token (the
gradient w.r.t. the state after it, already scaled by the decay from beyond):

  dq  = scale * ((do v^T) * D) k + scale * lam^(i+1) * (do S^T)
  dv  = scale * ((q k^T) * D)^T do + (lam^(C-1-j) * k) G
  dk  = scale * ((do v^T) * D)^T q + lam^(C-1-j) * (v G^T)
  G'  = lam^C G + scale * (lam^(i+1) * q)^T do         (the gradient of S)

Every decay is exp of a non-positive exponent masked before exp. The chunk
holding the last real token T-1 ends early: `k_decay`/`chunk_decay` take the
offset of that token in the chunk (`last`; C-1 for full chunks, negative for
chunks of padding only, which then pass states through unchanged).

Low-precision inputs meet the tensor cores in their own dtype (the f32 state
is cast for the q S product, as fla does) with f32 accumulation; f32 inputs
use exact f32 products (`precision=HIGHEST`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def dot_precision(dtype):
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot(a, b, *, ta=False, tb=False):
  """a @ b with a or b transposed (contracting dims, no data transpose)."""
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=dot_precision(a.dtype),
                             preferred_element_type=_F32)


def _iota(shape, axis):
  return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def intra_decay(slope, c: int, scale: float = 1.0):
  """scale * D [C, C] with D_ij = lam^(i-j) for i >= j, else 0."""
  i, j = _iota((c, c), 0), _iota((c, c), 1)
  return scale * jnp.exp(jnp.where(i >= j, -slope * (i - j).astype(_F32),
                                   -jnp.inf))


def q_decay(slope, c: int, scale: float = 1.0):
  """scale * lam^(i+1) [C, 1]: a query's decay from the incoming state."""
  i = _iota((c, 1), 0)
  return scale * jnp.exp(-slope * (i + 1).astype(_F32))


def k_decay(slope, c: int, last):
  """lam^(last-j) [C, 1] for j <= last, else 0 (tokens past the end)."""
  j = _iota((c, 1), 0)
  last = jnp.minimum(last, c - 1)
  return jnp.exp(jnp.where(j <= last, -slope * (last - j).astype(_F32),
                           -jnp.inf))


def chunk_decay(slope, c: int, last):
  """lam^(min(last, C-1) + 1): the state's decay across the chunk (1 for a
  chunk of padding only)."""
  n = jnp.maximum(jnp.minimum(last, c - 1) + 1, 0)
  return jnp.exp(-slope * n.astype(_F32))


def output(q, k, v, state, d_scaled, qd_scaled):
  """o [C, d_v] f32 (d_scaled, qd_scaled: intra_decay, q_decay * scale)."""
  s = _dot(q, k, tb=True) * d_scaled
  return (_dot(s.astype(v.dtype), v)
          + _dot(q, state.astype(q.dtype)) * qd_scaled)


def state_step(state, k, v, kd, cd, *, decay_v: bool = False):
  """The state after the chunk: cd * S + (kd * k)^T v (cd None: S + ..., a
  plain accumulation). decay_v: the same as k^T (kd * v) (the rounding
  falls on v; on Hopper k^T is then read from shared memory as it is)."""
  if decay_v:
    add = _dot(k, (v * kd).astype(v.dtype), ta=True)
  else:
    add = _dot((k * kd).astype(k.dtype), v, ta=True)
  return state + add if cd is None else state * cd + add


def grad_q(do, k, v, state, d_scaled, qd_scaled):
  """dq [C, d_k] f32 (state: S entering the chunk)."""
  dp = _dot(do, v, tb=True) * d_scaled
  return (_dot(dp.astype(k.dtype), k)
          + _dot(do, state.astype(do.dtype), tb=True) * qd_scaled)


def grad_v(q, k, do, grad, d_scaled, kd):
  """dv [C, d_v] f32 (grad: G entering at the chunk's end)."""
  a = _dot(q, k, tb=True) * d_scaled
  return (_dot(a.astype(do.dtype), do, ta=True)
          + _dot((k * kd).astype(k.dtype), grad.astype(k.dtype)))


def grad_k(q, v, do, grad, d_scaled, kd):
  """dk [C, d_k] f32."""
  dp = _dot(do, v, tb=True) * d_scaled
  return (_dot(dp.astype(q.dtype), q, ta=True)
          + _dot(v, grad.astype(v.dtype), tb=True) * kd)


def grad_kv(q, k, v, do, grad, d_scaled, kd):
  """(dk, dv): `grad_k` and `grad_v` (kernels call them one after the
  other, storing each result before the next, to bound live registers)."""
  return (grad_k(q, v, do, grad, d_scaled, kd),
          grad_v(q, k, do, grad, d_scaled, kd))


def grad_state_step(grad, q, do, qd_scaled, cd, *, decay_do: bool = False):
  """The gradient leaving the chunk at its start: cd * G + (qd q)^T do (cd
  None: G + ...; decay_do: as q^T (qd do), see `state_step`)."""
  if decay_do:
    add = _dot(q, (do * qd_scaled).astype(do.dtype), ta=True)
  else:
    add = _dot((q * qd_scaled).astype(q.dtype), do, ta=True)
  return grad + add if cd is None else grad * cd + add
