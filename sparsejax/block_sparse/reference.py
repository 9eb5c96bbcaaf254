"""Dense jax.numpy reference: the definition every implementation must match."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from sparsejax.block_sparse.block_mask import BlockMask
from sparsejax.block_sparse import segments as segments_lib


def attention_reference(q, k, v, mask: Optional[BlockMask] = None, *,
                        scale: float, soft_cap: Optional[float] = None,
                        score_mod=None, q_segment_ids=None,
                        kv_segment_ids=None):
  """Masked softmax attention. Returns (out [B,Lq,H,D], lse [B,H,Lq]).

  logits = soft_cap(score_mod(scale * q.k, b, h, q_idx, kv_idx)), visible
  where the mask allows and the segment ids are equal. Computed in f32 (f64
  for f64 inputs). A query row with no visible key gets output 0 and lse
  -inf, and its gradients are 0 (safe division keeps NaN out of the unused
  branch).
  """
  b, lq, h, _ = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  dt = jnp.promote_types(q.dtype, jnp.float32)
  kr = jnp.repeat(k, h // hkv, axis=2).astype(dt)
  vr = jnp.repeat(v, h // hkv, axis=2).astype(dt)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dt), kr,
                 precision=jax.lax.Precision.HIGHEST) * scale
  if score_mod is not None:
    s = jnp.broadcast_to(score_mod(
        s, jnp.arange(b)[:, None, None, None],
        jnp.arange(h)[None, :, None, None],
        jnp.arange(lq)[None, None, :, None],
        jnp.arange(lk)[None, None, None, :]), s.shape).astype(dt)
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  visible = None
  if mask is not None:
    visible = mask.to_dense()
  if q_segment_ids is not None:
    same = segments_lib.visible(q_segment_ids, kv_segment_ids)
    visible = same if visible is None else visible & same
  if visible is not None:
    s = jnp.where(jnp.broadcast_to(visible, s.shape), s, -jnp.inf)
  m = s.max(-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = p.sum(-1, keepdims=True)
  l_safe = jnp.where(l > 0, l, 1.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", p / l_safe, vr,
                   precision=jax.lax.Precision.HIGHEST)
  lse = jnp.where(l[..., 0] > 0, m[..., 0] + jnp.log(l_safe[..., 0]), -jnp.inf)
  return out.astype(q.dtype), lse
