"""Dense jax.numpy reference: the definition every implementation must match."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from sparsejax.block_sparse.block_mask import BlockMask


def attention_reference(q, k, v, mask: Optional[BlockMask] = None, *,
                        scale: float, soft_cap: Optional[float] = None):
  """Masked softmax attention in f32. Returns (out [B,Lq,H,D], lse [B,H,Lq]).

  A query row with no visible key gets output 0 and lse -inf, and its
  gradients are 0 (safe division keeps NaN out of the unused branch).
  """
  b, lq, h, _ = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  kr = jnp.repeat(k, h // hkv, axis=2).astype(jnp.float32)
  vr = jnp.repeat(v, h // hkv, axis=2).astype(jnp.float32)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kr,
                 precision=jax.lax.Precision.HIGHEST) * scale
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  if mask is not None:
    visible = jnp.broadcast_to(mask.to_dense(), (b, h, lq, lk))
    s = jnp.where(visible, s, -jnp.inf)
  m = s.max(-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = p.sum(-1, keepdims=True)
  l_safe = jnp.where(l > 0, l, 1.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", p / l_safe, vr,
                   precision=jax.lax.Precision.HIGHEST)
  lse = jnp.where(l[..., 0] > 0, m[..., 0] + jnp.log(l_safe[..., 0]), -jnp.inf)
  return out.astype(q.dtype), lse
