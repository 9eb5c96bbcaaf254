"""Low-rank sums: the linear-attention states Scatterbrain seeds rows with.

Forward (over keys, per kv head): H = sum_j k_hat_j v_j^T [m, d] and
Z = sum_j k_hat_j [m]; one pair for the whole sequence when bidirectional,
or, when causal, the exclusive prefix sums at each `chunk`-row boundary
(chunk c holds the sums over j < c * chunk; the rows inside a chunk add
their own keys in the kernel).

Backward (over queries, per q head): G = sum_i beta_i q_hat_i g_i^T [m, d]
and Y = sum_i kd_i beta_i q_hat_i [m]; bidirectional: one pair; causal: the
exclusive suffix sums (chunk c holds the sums over i >= (c + 1) * chunk).

All sums are f32 (f64 for f64 inputs); inputs are [B, L, heads, .] with L a multiple of chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

def _einsum(spec, a, b):
  """f32 (f64) accumulation; bf16 operands stay native (their products are
  exact in f32), others get IEEE f32 (fp16's range is too small for the
  beta-weighted query rows)."""
  dt = jnp.promote_types(a.dtype, jnp.float32)
  if a.dtype == jnp.bfloat16:
    return jnp.einsum(spec, a, b.astype(a.dtype), preferred_element_type=dt)
  return jnp.einsum(spec, a.astype(dt), b.astype(dt),
                    precision=jax.lax.Precision.HIGHEST)


def _chunked(x, chunk):
  b, l = x.shape[:2]
  return x.reshape(b, l // chunk, chunk, *x.shape[2:])


def kv_states(kf, v, *, chunk: int, causal: bool, num_chunks: int):
  """(H [B, Hkv, n, m, d], Z [B, Hkv, n, m]); n = num_chunks if causal else 1.

  kf: k_hat [B, L, Hkv, m] (zero on padded rows); v [B, L, Hkv, d].
  """
  dt = jnp.promote_types(kf.dtype, jnp.float32)
  if not causal:
    h = _einsum("blhm,blhd->bhmd", kf, v)
    return h[:, :, None], kf.astype(dt).sum(1)[:, :, None]
  kc, vc = _chunked(kf, chunk), _chunked(v, chunk)
  h = _einsum("bclhm,bclhd->bhcmd", kc, vc)
  z = jnp.einsum("bclhm->bhcm", kc.astype(dt))
  # Exclusive prefix: chunk c sees the keys before it.
  h = jnp.cumsum(h, axis=2) - h
  z = jnp.cumsum(z, axis=2) - z
  return h[:, :, :num_chunks], z[:, :, :num_chunks]


def q_states(qf, do, beta, kd, *, chunk: int, causal: bool, num_chunks: int):
  """(G [B, H, n, m, d], Y [B, H, n, m]); n = num_chunks if causal else 1.

  qf: q_hat [B, L, H, m]; do [B, L, H, d]; beta, kd: [B, H, L] (zero-padded
  rows contribute nothing since their do and kd are zero).
  """
  dt = jnp.promote_types(qf.dtype, jnp.float32)
  w = qf.astype(dt) * jnp.swapaxes(beta, 1, 2)[..., None]
  y_rows = w * jnp.swapaxes(kd, 1, 2)[..., None]
  w = w.astype(do.dtype)  # G's operands in the inputs' dtype
  if not causal:
    g = _einsum("blhm,blhd->bhmd", w, do)
    return g[:, :, None], y_rows.sum(1)[:, :, None]
  g = _einsum("bclhm,bclhd->bhcmd", _chunked(w, chunk), _chunked(do, chunk))
  y = jnp.einsum("bclhm->bhcm", _chunked(y_rows, chunk))
  # Exclusive suffix: chunk c sees the queries after it.
  g = jnp.flip(jnp.cumsum(jnp.flip(g, 2), axis=2), 2) - g
  y = jnp.flip(jnp.cumsum(jnp.flip(y, 2), axis=2), 2) - y
  return g[:, :, :num_chunks], y[:, :, :num_chunks]
