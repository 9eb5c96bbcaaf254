"""impl="xla": Lightning Attention-2 in chunked jnp, O(T) memory, any backend.

The sequence is cut into chunks of C tokens (default 64). Per chunk: the
intra-chunk part ((q k^T) * D) v as batched einsums over all chunks at once,
the chunk's own state contribution (lam^(C-1-j) k)^T v, and the states
entering each chunk from an associative scan over chunks (log depth, so it
is fast on GPUs too) of pairs (log decay, state): exponents are sums of
non-positive terms, so nothing overflows at any slope or length. Gradients
(q, k, v, initial state and slopes) come from autodiff.

Memory is O(T (C + d_k d_v / C)) per head: the per-chunk states are stored,
as fla's chunk kernels store theirs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax import registry
from sparsejax.linear.reference import decay_matrix

DEFAULT_CHUNK = 64


def _pad_time(x, t_pad):
  return jnp.pad(x, ((0, 0), (0, t_pad - x.shape[1]), (0, 0), (0, 0)))


def _einsum(spec, a, b, dt):
  """f32-accumulated products; 16-bit operands stay 16-bit on accelerators.

  XLA:CPU lacks some bf16 x bf16 -> f32 dots (in transposes), so on CPU the
  operands are widened first (same values: widening is exact).
  """
  if a.dtype.itemsize < 4 and registry.platform()[0] == "cpu":
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  prec = None if a.dtype.itemsize < 4 else jax.lax.Precision.HIGHEST
  return jnp.einsum(spec, a, b, precision=prec, preferred_element_type=dt)


def lightning_attention(q, k, v, slopes, initial_state, *, scale,
                        chunk_size=None, return_final_state=False,
                        interpret=False, tuning=None):
  """(o [B, T, H, d_v] f32, final state or None); see sparsejax.linear.api."""
  del interpret, tuning
  c = chunk_size or DEFAULT_CHUNK
  b, t, h, d = q.shape
  e = v.shape[-1]
  dt = jnp.result_type(jnp.float32, q.dtype)  # float64 stays float64
  nt = -(-t // c)
  q, k, v = (_pad_time(x, nt * c).reshape(b, nt, c, h, x.shape[-1])
             for x in (q, k, v))
  s = slopes.astype(dt)
  pos = jnp.arange(c)
  # Offset of each chunk's last real token (C-1 except in the final chunk).
  last = jnp.minimum(c - 1, t - 1 - jnp.arange(nt) * c)  # [nt]
  kd = jnp.exp(jnp.where(pos[None, :] <= last[:, None],
                         -s[:, None, None] * (last[:, None] - pos[None, :]),
                         -jnp.inf))  # [H, nt, C]
  log_cd = -s[:, None] * (last + 1)  # [H, nt]
  qd = scale * jnp.exp(-s[:, None] * (pos + 1))  # [H, C]

  a = _einsum("bnihd,bnjhd->bnhij", q, k, dt) * (scale * decay_matrix(s, c))
  o = _einsum("bnhij,bnjhe->bnihe", a.astype(v.dtype), v, dt)
  kw = (k * jnp.moveaxis(kd, 0, -1)[None, :, :, :, None]).astype(k.dtype)
  ds = _einsum("bnjhd,bnjhe->bnhde", kw, v, dt)  # per-chunk contributions

  def combine(x, y):
    (ax, sx), (ay, sy) = x, y
    return ax + ay, jnp.exp(ay)[..., None, None] * sx + sy

  log_cd = jnp.broadcast_to(log_cd.T[None], (1, nt, h))
  cum, ends = jax.lax.associative_scan(combine, (log_cd, ds), axis=1)
  if initial_state is not None:  # state after chunk n, from S0 and S_-1
    s0 = initial_state.astype(dt)[:, None]
    ends = ends + jnp.exp(cum)[..., None, None] * s0
  else:
    s0 = jnp.zeros((b, 1, h, d, e), dt)
  starts = jnp.concatenate([s0, ends[:, :-1]], axis=1)
  inter = _einsum("bnihd,bnhde->bnihe", q, starts.astype(q.dtype), dt)
  o = o + inter * jnp.moveaxis(qd, 0, -1)[None, None, :, :, None]
  o = o.reshape(b, nt * c, h, e)[:, :t]
  return o, (ends[:, -1] if return_final_state else None)
