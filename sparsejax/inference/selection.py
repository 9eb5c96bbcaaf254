"""Decode-time top-k selection shared by Quest, Double Sparsity, TidalDecode.

Scores come per q head; a list per kv head serves the kv head's whole group
as the rows of one kernel tile, so the group's scores are reduced by max (an
item is kept if any q head of the group ranks it high; with one q head per
kv head this is the per-head selection of the papers). `per_head=True`
keeps one list per q head instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reduce_group(scores, num_kv_heads: int, per_head: bool = False):
  """[B, H, N] per-q-head scores -> [B, Hkv, N] (max over each group), or
  unchanged when per_head."""
  if per_head:
    return scores
  b, h, n = scores.shape
  return scores.reshape(b, num_kv_heads, h // num_kv_heads, n).max(2)


def top_k_sorted(scores, counts, k: int):
  """The `counts` best of scores [B, Hl, N] (k >= counts, static), sorted
  by index: int32 [B, Hl, k], valid entries first; padding repeats a valid
  index so every entry can be read safely."""
  n = scores.shape[-1]
  k = min(k, n)
  _, idx = jax.lax.top_k(scores, k)
  rank = jnp.arange(k)
  keyed = jnp.where(rank < counts[..., None], idx, n)
  keyed = jnp.sort(keyed, axis=-1)
  return jnp.minimum(keyed, n - 1).astype(jnp.int32)


def budget_count(lengths, budget: int, unit: int = 1):
  """Units (pages or tokens) per sequence: min(budget, ceil(len / unit))."""
  return jnp.minimum(budget, -(-lengths // unit)).astype(jnp.int32)


def mask_positions(scores, lengths, unit: int = 1):
  """-inf where unit index * unit >= lengths (past the cached tokens)."""
  n = scores.shape[-1]
  valid = jnp.arange(n)[None, None] * unit < lengths[:, None, None]
  return jnp.where(valid, scores, -jnp.inf)


def dense_attention(q, k, v, visible, scale):
  """Masked softmax attention of q [B, H, D] over k, v [B, N, Hkv, D] with
  visible bool [B, H, N] (the references' common core, f32+)."""
  b, h, d = q.shape
  g = h // k.shape[2]
  dt = jnp.promote_types(q.dtype, jnp.float32)
  kk = jnp.repeat(k.astype(dt), g, axis=2)
  vv = jnp.repeat(v.astype(dt), g, axis=2)
  s = jnp.einsum("bhd,bnhd->bhn", q.astype(dt), kk,
                 precision=jax.lax.Precision.HIGHEST) * scale
  s = jnp.where(visible, s, -jnp.inf)
  m = s.max(-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  den = p.sum(-1, keepdims=True)
  p = p / jnp.where(den > 0, den, 1.0)
  return jnp.einsum("bhn,bnhd->bhd", p, vv,
                    precision=jax.lax.Precision.HIGHEST).astype(q.dtype)


def positions_visible(positions, counts, n: int, num_heads: int):
  """bool [B, H, n] from per-list selected indices [B, Hl, K]."""
  b, hl, k = positions.shape
  ok = jnp.arange(k)[None, None] < counts[..., None]
  vis = jnp.zeros((b, hl, n), bool)
  bi = jnp.arange(b)[:, None, None]
  li = jnp.arange(hl)[None, :, None]
  vis = vis.at[bi, li, jnp.where(ok, positions, n)].set(True, mode="drop")
  return jnp.repeat(vis, num_heads // hl, axis=1)
