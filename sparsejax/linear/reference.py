"""The definition of Lightning Attention-2, in plain jnp (float64-capable).

Per batch and head, with slope s >= 0 and decay lam = exp(-s):

  S_{-1} = initial_state (or 0)
  S_t = lam * S_{t-1} + k_t^T v_t        (k_t [d_k], v_t [d_v], S [d_k, d_v])
  o_t = scale * q_t S_t

`lightning_recurrence` is that scan, token by token; `lightning_quadratic` is
the equal masked form o = ((scale Q K^T) * D) V + scale diag(lam^(i+1)) Q S0
with D_ij = lam^(i-j) for i >= j, 0 above the diagonal. D is formed as
exp(where(i >= j, -s (i - j), -inf)): the exponent is masked before exp, so
no entry overflows and gradients stay finite (never lam^i * lam^-j).

Both compute in float32, or float64 when given float64 inputs (the tests run
them under `jax.experimental.enable_x64`), and return (o, final_state) in that
precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _compute_dtype(*xs):
  return jnp.result_type(jnp.float32, *[x.dtype for x in xs])


def _precision(dtype):
  # Exact products on GPU too (XLA would use TF32 for f32 by default).
  return jax.lax.Precision.HIGHEST


def lightning_recurrence(q, k, v, slopes, *, scale=1.0, initial_state=None):
  """The recurrence, one token at a time (lax.scan over T).

  Args:
    q, k: [batch, T, heads, d_k]; v: [batch, T, heads, d_v].
    slopes: [heads], decay lam_h = exp(-slopes_h).
    scale: multiplies q S_t.
    initial_state: [batch, heads, d_k, d_v] or None (zeros).

  Returns:
    (o [batch, T, heads, d_v], final_state [batch, heads, d_k, d_v]).
  """
  dt = _compute_dtype(q, k, v, slopes)
  b, _, h, d = q.shape
  e = v.shape[-1]
  prec = _precision(dt)
  lam = jnp.exp(-slopes.astype(dt))[:, None, None]
  s0 = (jnp.zeros((b, h, d, e), dt) if initial_state is None
        else initial_state.astype(dt))

  def step(state, x):
    qt, kt, vt = x
    state = lam * state + kt[..., :, None] * vt[..., None, :]
    return state, scale * jnp.einsum("bhd,bhde->bhe", qt, state,
                                     precision=prec)

  xs = tuple(jnp.moveaxis(x.astype(dt), 1, 0) for x in (q, k, v))
  final, o = jax.lax.scan(step, s0, xs)
  return jnp.moveaxis(o, 0, 1), final


def decay_matrix(slopes, t):
  """D [heads, t, t] = lam^(i - j) for i >= j, else 0 (masked exponent)."""
  i = jnp.arange(t)[:, None]
  j = jnp.arange(t)[None, :]
  diff = (i - j).astype(slopes.dtype)
  return jnp.exp(jnp.where(i >= j, -slopes[:, None, None] * diff, -jnp.inf))


def lightning_quadratic(q, k, v, slopes, *, scale=1.0, initial_state=None):
  """The masked quadratic form (O(T^2) memory); same arguments and returns
  as `lightning_recurrence`."""
  dt = _compute_dtype(q, k, v, slopes)
  q, k, v, s = (x.astype(dt) for x in (q, k, v, slopes))
  t = q.shape[1]
  prec = _precision(dt)
  a = jnp.einsum("bihd,bjhd->bhij", q, k, precision=prec)
  a = a * (scale * decay_matrix(s, t))
  o = jnp.einsum("bhij,bjhe->bihe", a, v, precision=prec)
  pos = jnp.arange(t, dtype=dt)
  # lam^(T-1-j): the weight of token j in the final state.
  w = jnp.exp(-s[:, None] * (t - 1 - pos))  # [H, T]
  final = jnp.einsum("bjhd,hj,bjhe->bhde", k, w, v, precision=prec)
  if initial_state is not None:
    s0 = initial_state.astype(dt)
    qd = jnp.exp(-s[:, None] * (pos + 1))  # lam^(i+1): [H, T]
    o = o + scale * jnp.einsum("bihd,hi,bhde->bihe", q, qd, s0,
                               precision=prec)
    final = final + jnp.exp(-s * t)[:, None, None] * s0
  return o, final


def decode_reference(q, k, v, state, slopes, *, scale=1.0):
  """One step: new = lam * state + k^T v; o = scale * q new.

  q, k [batch, heads, d_k], v [batch, heads, d_v], state [batch, heads, d_k,
  d_v]; returns (o [batch, heads, d_v], new_state) in the state's precision
  (at least float32).
  """
  dt = _compute_dtype(state, q, k, v, slopes)
  lam = jnp.exp(-slopes.astype(dt))[:, None, None]
  new = lam * state.astype(dt) + (k.astype(dt)[..., :, None] *
                                   v.astype(dt)[..., None, :])
  o = scale * jnp.einsum("bhd,bhde->bhe", q.astype(dt), new,
                         precision=_precision(dt))
  return o, new
