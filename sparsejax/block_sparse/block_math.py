"""Per-block attention math shared by the blockwise XLA path and the kernels.

These functions act on values (one q block against one kv block), so the jnp
implementation and the Pallas kernels run literally the same arithmetic.
A score mod (score_mods.py) is applied to the scaled logits before soft-cap;
`at` = (b, h, q_idx, kv_idx) are its block coordinates (`coords`).
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


def coords(b, h, q_start, kv_start, bq, bk):
  """(b, h, q_idx [bq, bk], kv_idx [bq, bk]) of one block: a mod's inputs."""
  q_idx = q_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  kv_idx = kv_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  return b, h, q_idx, kv_idx


def bias_factor(soft_cap):
  """What an additive mod's bias is multiplied by to join the scaled logits
  (`logits(..., bias=)`): log2(e), or 1/soft_cap inside the tanh."""
  return LOG2E if soft_cap is None else 1.0 / soft_cap


def logits(s_raw, scale, soft_cap, mod=None, at=None, bias=None):
  """Raw q.k -> (base-2 logits, tanh or None, d mod/d score or None).

  Order: s = s_raw * scale -> mod(s, *at) -> soft-cap -> * log2(e). Without
  a mod this is `log2_logits`. d mod/d score is None for additive mods (it
  is 1), else it comes from jax.jvp (score mods are elementwise).
  bias: instead of mod and at, an additive mod's bias times
  bias_factor(soft_cap), computed by the caller (the Triton kernels:
  ScoreMod.tile_bias, which folds the factor into the mod's scalars); equal
  up to rounding, one multiply per element fewer.
  """
  if bias is not None:
    bias = jnp.asarray(bias, jnp.float32)
    if soft_cap is None:
      return s_raw * (scale * LOG2E) + bias, None, None
    t = jnp.tanh(s_raw * (scale / soft_cap) + bias)
    return t * (soft_cap * LOG2E), t, None
  if mod is None:
    s, t = log2_logits(s_raw, scale, soft_cap)
    return s, t, None
  s = s_raw * scale
  if getattr(mod, "additive", False):
    u, dmod = mod(s, *at), None
  else:
    u, dmod = jax.jvp(lambda x: mod(x, *at), (s,), (jnp.ones_like(s),))
  u = jnp.broadcast_to(u, s.shape).astype(jnp.float32)
  if soft_cap is None:
    return u * LOG2E, None, dmod
  t = jnp.tanh(u * (1.0 / soft_cap))
  return t * (soft_cap * LOG2E), t, dmod


def scores(q, k, scale, soft_cap, mod=None, at=None, bias=None):
  """Logits [bq, bk] in f32, base 2 (after scale, mod and soft-cap)."""
  return logits(raw_scores(q, k), scale, soft_cap, mod, at, bias)[0]


def element_mask(mask_fn, b, h, q_start, kv_start, bq, bk, kv_len,
                 need_range, segments=None):
  """The element mask of one block, or None when nothing is masked.

  segments: None or (q ids [bq] | [bq, 1], kv ids [bk] | [1, bk]): pairs
  with different ids are masked.
  """
  q_idx = q_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  kv_idx = kv_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  m = None
  if mask_fn is not None:
    m = jnp.broadcast_to(mask_fn(b, h, q_idx, kv_idx), (bq, bk))
  if segments is not None:
    sq, sk = segments
    sq = sq[:, None] if sq.ndim == 1 else sq
    sk = sk[None, :] if sk.ndim == 1 else sk
    same = jnp.broadcast_to(sq == sk, (bq, bk))
    m = same if m is None else (m & same)
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


def neg_lse2(lse):
  """-lse in base 2, -inf (p = 0) for rows that see nothing; [bq, 1]."""
  return jnp.where(lse == -jnp.inf, -jnp.inf, lse * -LOG2E)[:, None]


def grads_from_raw(s_raw, v, do, lse, delta, scale, soft_cap, visible,
                   mod=None, at=None, bias=None, bias_has_lse=False):
  """(p, g, ds) of one block pair from its raw scores q.k: recomputed
  probabilities, g = dL/d(mod output) (the score-mod parameter gradient's
  input; 0 where not visible) and ds = dL/d(raw q.k).

  Rows with lse = -inf (nothing visible) get p = 0 and so zero gradients.
  bias_has_lse: `bias` (soft_cap None) already holds neg_lse2(lse) (a mod's
  tile_bias folds it into its per-row term), so p = exp2(logits).
  """
  s, t, dmod = logits(s_raw, scale, soft_cap, mod, at, bias)
  if bias_has_lse:
    p = jnp.exp2(s)
  else:
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
    p = jnp.exp2(s - lse2[:, None])
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
  dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())),
                           precision=dot_precision(do.dtype),
                           preferred_element_type=jnp.float32)
  g = p * (dp - delta[:, None])
  if soft_cap is not None:
    g = g * (1.0 - t * t)
  ds = g if dmod is None else g * dmod
  return p, g, ds * scale


def raw_scores(q, k):
  """q.k^T [bq, bk] in f32."""
  return jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                             precision=dot_precision(q.dtype),
                             preferred_element_type=jnp.float32)


def probs_and_grads(q, k, v, do, lse, delta, scale, soft_cap, visible,
                    mod=None, at=None, bias=None):
  """`grads_from_raw` after the q.k product."""
  s_raw = raw_scores(q, k)
  return grads_from_raw(s_raw, v, do, lse, delta, scale, soft_cap, visible,
                        mod, at, bias)


def probs_and_dscores(q, k, v, do, lse, delta, scale, soft_cap, visible,
                      mod=None, at=None):
  """Recomputed probabilities p and dL/d(raw q.k) for one block pair."""
  p, _, ds = probs_and_grads(q, k, v, do, lse, delta, scale, soft_cap,
                             visible, mod, at)
  return p, ds
