"""Per-block Scatterbrain math shared by the blockwise XLA path and kernels.

Values, not refs: one q block against one kv block, so the jnp path and the
Pallas kernels run the same arithmetic. Scores are base 2 as in the core's
block_math (scale * log2(e) folded in); u = q_hat . k_hat is the low-rank
estimate in its stabilised units, worth u * 2^pls2 (pls2 [bq] the row's
log2 feature scale).

Forward carry per row: (m, ls, lc, acc) in units of 2^m:
  m   running max of the exponents, seeded with pls2 (finite: no -inf);
  ls  sum over the support of e^s (exact part of the normaliser);
  lc  the low-rank mass outside the support: seeded with the row's low-rank
      sum over A(i), minus u on each visited support entry;
  acc the numerator: seeded with q_hat^T sum_A k_hat v^T, plus
      (e^s - u 2^pls2) v on the support.
Finalize clamps lc at 1e-24 * 2^pls2 (the official code's clamp; see
reference.py) and gives out, lse = log(den) (nats) and kappa = [lc was
above the clamp] (the clamp passes no gradient).

Backward, with lse, delta_i = do_i . out_i, beta_i = exp(pls_i - lse_i)
and kd_i = kappa_i delta_i, per support entry:
  p = e^{s - lse}, ds = p (dp - delta)            (the softmax part)
  r = beta (dp - kd)                               (minus dL/du)
  pv = p - beta u                                  (the weight of v)
dq += scale ds k, dk += scale ds^T q, dv += pv^T do, dq_hat -= r k_hat,
dk_hat -= r^T q_hat; the low-rank sums over A(i) seed dq_hat, dk_hat, dv.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.block_sparse import block_math

LOG2E, LN2 = block_math.LOG2E, block_math.LN2
TINY = 1e-24


def dot(a, b, trans_b=False, trans_a=False):
  """a @ b (or with a / b transposed), f32 accumulation, IEEE for f32."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims,
                             precision=block_math.dot_precision(a.dtype),
                             preferred_element_type=jnp.float32)


def causal_tile(rows, cols, row_start, col_start):
  """bool [rows, cols]: key col_start + c is visible to query row_start + r
  under top-left causal attention (kv <= q)."""
  r = row_start + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
  c = col_start + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
  return c <= r


# --- forward ----------------------------------------------------------------


def seed_forward(qf, h_state, z_state, kf_c=None, v_c=None):
  """(acc, lc): the row's low-rank numerator and normaliser over A(i).

  qf [bq, m]; h_state [m, d] and z_state [m] (f32) sum the keys before the
  chunk (or all keys); causal rows add their own chunk's keys j <= i,
  kf_c [bq, m] and v_c [bq, d] (the chunk starts at the q block's start).
  """
  acc = dot(qf, h_state.astype(qf.dtype))
  lc = jnp.sum(qf.astype(jnp.float32) * z_state[None, :], -1)
  if kf_c is not None:
    n = qf.shape[0]
    u = jnp.where(causal_tile(n, n, 0, 0), dot(qf, kf_c, trans_b=True), 0.0)
    acc = acc + dot(u.astype(v_c.dtype), v_c)
    lc = lc + u.sum(-1)
  return acc, lc


def init_carry(pls2, acc, lc):
  return pls2, jnp.zeros_like(lc), lc, acc


def step(s, u, v, pls2, carry, visible):
  """One support block: s [bq, bk] base-2 logits, u [bq, bk] = q_hat k_hat^T;
  `visible` None means every entry is in the support."""
  if visible is not None:
    s = jnp.where(visible, s, -jnp.inf)
    u = jnp.where(visible, u, 0.0)
  m, ls, lc, acc = carry
  m_new = jnp.maximum(m, s.max(-1))
  alpha = jnp.exp2(m - m_new)
  lr = jnp.exp2(pls2 - m_new)
  e = jnp.exp2(s - m_new[:, None])
  w = e - u * lr[:, None]
  ls = alpha * ls + e.sum(-1)
  lc = alpha * lc - lr * u.sum(-1)
  acc = acc * alpha[:, None] + dot(w.astype(v.dtype), v)
  return m_new, ls, lc, acc


def finalize(pls2, carry, out_dtype):
  """(out, lse [nats], kappa) of a row block."""
  m, ls, lc, acc = carry
  tiny = TINY * jnp.exp2(pls2 - m)
  kappa = lc > tiny
  den = ls + jnp.where(kappa, lc, tiny)
  out = acc / den[:, None]
  lse = (m + jnp.log2(den)) * LN2
  return out.astype(out_dtype), lse, kappa.astype(jnp.float32)


# --- backward ---------------------------------------------------------------


def block_grads(q, k, v, do, qf, kf, lse, delta, beta, kd, scale, visible):
  """(ds, r, pv) [bq, bk] of one support block (module doc); ds includes
  the scale, so dq += ds k and dk += ds^T q."""
  s = block_math.scores(q, k, scale, None)
  lse2 = lse * LOG2E
  p = jnp.exp2(s - lse2[:, None])
  u = dot(qf, kf, trans_b=True)
  dp = dot(do, v, trans_b=True)
  r = beta[:, None] * (dp - kd[:, None])
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
    u = jnp.where(visible, u, 0.0)
    r = jnp.where(visible, r, 0.0)
  ds = p * (dp - delta[:, None]) * scale
  pv = p - beta[:, None] * u
  return ds, r, pv


def seed_dq(do, beta, kd, h_state, z_state, kf_c=None, v_c=None):
  """dq_hat [bq, m] from the low-rank sums over A(i):
  beta_i (sum_A k_hat_j (v_j . do_i) - kd_i sum_A k_hat_j)."""
  g = dot(do, h_state.astype(do.dtype), trans_b=True) - (
      kd[:, None] * z_state[None, :])
  if kf_c is not None:
    n = do.shape[0]
    x = jnp.where(causal_tile(n, n, 0, 0),
                  dot(do, v_c, trans_b=True) - kd[:, None], 0.0)
    g = g + dot(x.astype(kf_c.dtype), kf_c)
  return beta[:, None] * g


def seed_dkv(kf, v, g_state, y_state, qf_c=None, do_c=None, beta_c=None,
             kd_c=None):
  """(dk_hat [bk, m], dv [bk, d]) from the queries i with j in A(i):
  G v_j - Y and G^T k_hat_j, G = sum beta_i q_hat_i do_i^T, Y = sum kd_i
  beta_i q_hat_i over the queries after the chunk (or all); causal columns
  add their own chunk's queries i >= j (qf_c, do_c, beta_c, kd_c: the rows
  at the kv block's positions)."""
  dkf = dot(v, g_state.astype(v.dtype), trans_b=True) - y_state[None, :]
  dv = dot(kf, g_state.astype(kf.dtype))
  if qf_c is not None:
    n = kf.shape[0]
    # [j, i]: query i >= key j (built directly: no bool transpose).
    below = ~causal_tile(n, n, 0, 1)
    wt = jnp.where(below, beta_c[None, :] * (dot(v, do_c, trans_b=True)
                                             - kd_c[None, :]), 0.0)
    dkf = dkf + dot(wt.astype(qf_c.dtype), qf_c)
    ut = jnp.where(below, beta_c[None, :] * dot(kf, qf_c, trans_b=True), 0.0)
    dv = dv + dot(ut.astype(do_c.dtype), do_c)
  return dkf, dv
