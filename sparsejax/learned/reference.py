"""Dense jax.numpy references: the definitions the learned family matches.

Everything here materialises [q_len, kv_len] and is meant for tests and
small inputs. Float64 inputs are computed in float64 (under
`jax.enable_x64`), so the tests check the blockwise paths and kernels against
a float64 ground truth.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def _compute_dtype(x):
  return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _repeat_kv(k, heads):
  """[B, L, Hkv, D] -> [B, L, heads, D] (GQA: q head h reads kv head
  h // (heads // Hkv))."""
  return jnp.repeat(k, heads // k.shape[2], axis=2)


def block_attention_probs_reference(q, k, *, block_size: int,
                                    causal: bool = True,
                                    scale: Optional[float] = None,
                                    normalize: bool = True):
  """SeerAttention's distillation target, densely.

  P[b, h, I, J] = max over rows i of q block I and columns j of kv block J of
  softmax_j(scale * q_i . k_j) (each row normalised over its full visible
  row: causal means kv <= q), then, with `normalize`, P /= P.sum(-1) per
  (b, h, I), as the official `attn_pooling_kernel_2d.py` does. Blocks
  with no visible entry are 0.

  Args:
    q: [B, Lq, H, D]; k: [B, Lk, Hkv, D] with H % Hkv == 0.
    block_size: rows and columns per block (the last block may be ragged).
    causal: top-left aligned causal mask.
    scale: logit scale, default D ** -0.5.
    normalize: row-normalise over kv blocks.

  Returns:
    [B, H, ceil(Lq / block_size), ceil(Lk / block_size)] in f32 (f64 for
    f64 inputs).
  """
  dt = _compute_dtype(q)
  b, lq, h, d = q.shape
  lk = k.shape[1]
  scale = d ** -0.5 if scale is None else scale
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dt), _repeat_kv(k, h).astype(dt),
                 precision=jax.lax.Precision.HIGHEST) * scale
  visible = jnp.ones((lq, lk), bool)
  if causal:
    visible = jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None]
  s = jnp.where(visible, s, -jnp.inf)
  m = s.max(-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(visible, jnp.exp(s - m), 0.0)
  l = p.sum(-1, keepdims=True)
  p = p / jnp.where(l > 0, l, 1.0)
  nq, nk = -(-lq // block_size), -(-lk // block_size)
  p = jnp.pad(p, ((0, 0), (0, 0), (0, nq * block_size - lq),
                  (0, nk * block_size - lk)))
  pooled = p.reshape(b, h, nq, block_size, nk, block_size).max((3, 5))
  if normalize:
    z = pooled.sum(-1, keepdims=True)
    pooled = pooled / jnp.where(z > 0, z, 1.0)
  return pooled


def routing_attention_reference(q, k, v, members, *, causal: bool = True,
                                scale: Optional[float] = None):
  """Routing attention with an explicit cluster membership, densely.

  Token t's output is the mean, over the clusters c that hold it, of softmax
  attention of q_t over the members of c (causal: by original position,
  kv <= q). Tokens in no cluster get 0.

  Args:
    q: [B, L, H, D]; k, v: [B, L, Hkv, D] (GQA).
    members: bool [B, H, C, L]: token l belongs to cluster c of head h.
    causal: attend only to members at or before the query position.
    scale: logit scale, default D ** -0.5.

  Returns:
    [B, L, H, D] in q's dtype.
  """
  dt = _compute_dtype(q)
  _, l, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  kr, vr = _repeat_kv(k, h).astype(dt), _repeat_kv(v, h).astype(dt)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dt), kr,
                 precision=jax.lax.Precision.HIGHEST) * scale
  vis = members[:, :, :, None, :] & members[:, :, :, :, None]  # [B,H,C,q,k]
  if causal:
    vis &= jnp.arange(l)[None, :] <= jnp.arange(l)[:, None]
  s = jnp.where(vis, s[:, :, None], -jnp.inf)
  m = s.max(-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(vis, jnp.exp(s - m), 0.0)
  den = p.sum(-1, keepdims=True)
  p = p / jnp.where(den > 0, den, 1.0)
  out = jnp.einsum("bhcqk,bkhd->bhcqd", p, vr,
                   precision=jax.lax.Precision.HIGHEST)
  count = members.sum(2).astype(dt)  # [B, H, L]
  out = out.sum(2) / jnp.maximum(count, 1.0)[..., None]
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def masked_attention_reference(q, k, v, visible, *,
                               scale: Optional[float] = None):
  """Softmax attention under an explicit bool mask [B|1, H|1, Lq, Lk].

  Rows with no visible key give 0. For the MInference pattern tests.
  """
  dt = _compute_dtype(q)
  h, d = q.shape[2], q.shape[3]
  scale = d ** -0.5 if scale is None else scale
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dt), _repeat_kv(k, h).astype(dt),
                 precision=jax.lax.Precision.HIGHEST) * scale
  s = jnp.where(visible, s, -jnp.inf)
  m = s.max(-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(visible, jnp.exp(s - m), 0.0)
  den = p.sum(-1, keepdims=True)
  p = p / jnp.where(den > 0, den, 1.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", p, _repeat_kv(v, h).astype(dt),
                   precision=jax.lax.Precision.HIGHEST)
  return out.astype(q.dtype)
