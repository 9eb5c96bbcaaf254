"""Per-block attention math shared by the blockwise XLA path and the kernels.

These functions act on values (one q block against one kv block), so the jnp
implementation and the Pallas kernels run literally the same arithmetic.
Scores live in the base-2 domain (scale * log2(e) folded into one multiply,
exp2 instead of exp: one FMA fewer per element); lse is returned in nats.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def dot_precision(dtype):
  # f32 inputs get IEEE f32 (Triton would otherwise use TF32); bf16/fp16 use
  # native MMA with f32 accumulation.
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def log2_logits(s_raw, scale, soft_cap):
  """Raw q.k -> logits in the base-2 domain, and tanh(.) if soft-capped."""
  if soft_cap is None:
    return s_raw * (scale * LOG2E), None
  t = jnp.tanh(s_raw * (scale / soft_cap))
  return t * (soft_cap * LOG2E), t


def scores(q, k, scale, soft_cap):
  """Logits [bq, bk] in f32, base 2 (after scale and optional soft-cap)."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                          precision=dot_precision(q.dtype),
                          preferred_element_type=jnp.float32)
  return log2_logits(s, scale, soft_cap)[0]


def element_mask(mask_fn, b, h, q_start, kv_start, bq, bk, kv_len,
                 need_range):
  """The element mask of one block, or None when nothing is masked."""
  q_idx = q_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  kv_idx = kv_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  m = None
  if mask_fn is not None:
    m = jnp.broadcast_to(mask_fn(b, h, q_idx, kv_idx), (bq, bk))
  if need_range:
    r = kv_idx < kv_len
    m = r if m is None else (m & r)
  return m


def online_softmax_step(s, v, m_prev, l_prev, acc, visible):
  """One flash-attention update; `visible` None means the block is full.

  m is the running max with -inf for rows that saw nothing yet; subtracting a
  0 in its place keeps exp() free of inf - inf.
  """
  if visible is not None:
    s = jnp.where(visible, s, -jnp.inf)
  m_new = jnp.maximum(m_prev, s.max(-1))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp2(s - m_safe[:, None])
  alpha = jnp.exp2(m_prev - m_safe)
  l_new = alpha * l_prev + p.sum(-1)
  pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                           precision=dot_precision(v.dtype),
                           preferred_element_type=jnp.float32)
  return m_new, l_new, acc * alpha[:, None] + pv


def finalize(m, l, acc, out_dtype):
  """Output and lse; rows with no visible key give 0 and -inf."""
  l_safe = jnp.where(l == 0.0, 1.0, l)
  out = jnp.where((l == 0.0)[:, None], 0.0, acc / l_safe[:, None])
  lse = jnp.where(l == 0.0, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)
  return out.astype(out_dtype), lse


def probs_and_dscores(q, k, v, do, lse, delta, scale, soft_cap, visible):
  """Recomputed probabilities p and dL/d(raw q.k) for one block pair.

  Rows with lse = -inf (nothing visible) get p = 0 and so zero gradients.
  """
  s_raw = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                              precision=dot_precision(q.dtype),
                              preferred_element_type=jnp.float32)
  s, t = log2_logits(s_raw, scale, soft_cap)
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
  p = jnp.exp2(s - lse2[:, None])
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
  dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())),
                           precision=dot_precision(do.dtype),
                           preferred_element_type=jnp.float32)
  ds = p * (dp - delta[:, None])
  if soft_cap is not None:
    ds = ds * (1.0 - t * t)
  return p, ds * scale
