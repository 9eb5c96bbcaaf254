"""Double Sparsity (Yang et al., arXiv 2408.07092): label-cache token selection.

Offline, `calibrate_channels` ranks each kv head's channels by the mean of
|q * k| over calibration tokens (post-RoPE, each token with itself; the
group's q heads summed) and keeps the top r ("heavy channels"). The cache
then keeps a label cache, the keys restricted to those channels
(`PagedKVCache(channels=...)`). A decode step computes approximate scores
q[ch] . K_label / sqrt(r), takes the top `token_budget` tokens per
(sequence, kv head) and attends them exactly (full head_dim) through the
paged kernel's token view (page 1: a step gathers 128 rows). The official
code selects per q head; kv-head lists reduce the group's scores by max
(`selection.reduce_group`; per_head=True keeps per-q-head lists).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from sparsejax.inference import selection
from sparsejax.inference.paged_cache import PagedKVCache, token_view
from sparsejax.inference.paged_decode import paged_decode_attention


def calibrate_channels(q, k, num_channels: int):
  """Top channels of mean |q * k| per kv head: int32 [Hkv, num_channels].

  q [..., H, D] and k [..., Hkv, D]: the same calibration tokens (post-RoPE),
  any leading axes (batch, length).
  """
  h, d = q.shape[-2:]
  hkv = k.shape[-2]
  if k.shape[-1] != d or q.shape[:-2] != k.shape[:-2] or h % hkv:
    raise ValueError(f"q [..., H, D] and k [..., Hkv, D] must share leading "
                     f"axes and head_dim, H % Hkv == 0; got {q.shape}, "
                     f"{k.shape}")
  if not 1 <= num_channels <= d:
    raise ValueError(f"num_channels must be in [1, {d}], got {num_channels}")
  qg = q.reshape(-1, hkv, h // hkv, d).astype(jnp.float32)
  kf = k.reshape(-1, hkv, 1, d).astype(jnp.float32)
  importance = jnp.abs(qg * kf).mean(0).sum(1)  # [Hkv, D]
  return jnp.argsort(-importance, axis=-1)[:, :num_channels].astype(
      jnp.int32)


def label_scores(q, labels, channels):
  """Approximate scores [B, H, N] f32 of q [B, H, D] against the label
  cache [B, Hkv, N, r] (channels [Hkv, r])."""
  b, h, d = q.shape
  hkv, r = channels.shape
  qg = q.reshape(b, hkv, h // hkv, d)
  ql = jnp.take_along_axis(qg, jnp.broadcast_to(channels[None, :, None],
                                                (b, hkv, h // hkv, r)), -1)
  s = jnp.einsum("bgrc,bgnc->bgrn", ql.astype(jnp.float32),
                 labels.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) * r ** -0.5
  return s.reshape(b, h, -1)


def select_tokens(q, labels, channels, lengths, *, token_budget: int,
                  token_fraction: Optional[float] = None,
                  per_head: bool = False):
  """(positions [B, Hl, K], counts [B, Hl]) that Double Sparsity attends:
  min(token_budget, length) tokens, or ceil(token_fraction * length)
  capped at token_budget (K = token_budget, static)."""
  s = selection.reduce_group(label_scores(q, labels, channels),
                             channels.shape[0], per_head)
  s = selection.mask_positions(s, lengths)
  counts = selection.budget_count(lengths, token_budget)
  if token_fraction is not None:
    want = jnp.ceil(lengths * token_fraction).astype(jnp.int32)
    counts = jnp.minimum(counts, jnp.maximum(want, 1))
  counts = jnp.broadcast_to(counts[:, None], s.shape[:2])
  return selection.top_k_sorted(s, counts, token_budget), counts


def ds_decode(q, cache: PagedKVCache, *, token_budget: int,
              token_fraction: Optional[float] = None, per_head: bool = False,
              scale: Optional[float] = None, impl: str = "auto",
              interpret: bool = False, tuning=None):
  """Decode attention of q [B, H, D] over Double Sparsity's tokens."""
  if cache.labels is None:
    raise ValueError("ds_decode needs a cache made with "
                     "PagedKVCache.create(..., channels=...)")
  positions, counts = select_tokens(q, cache.labels, cache.channels,
                                    cache.lengths, token_budget=token_budget,
                                    token_fraction=token_fraction,
                                    per_head=per_head)
  return paged_decode_attention(
      q, token_view(cache.k_pages), token_view(cache.v_pages),
      cache.token_lists(positions, counts), scale=scale, impl=impl,
      interpret=interpret, tuning=tuning)


def ds_reference(q, k, v, lengths, channels, *, token_budget: int,
                 token_fraction: Optional[float] = None,
                 per_head: bool = False, scale: Optional[float] = None):
  """The definition over a dense cache k, v [B, N, Hkv, D]."""
  d = k.shape[-1]
  scale = d ** -0.5 if scale is None else scale
  labels = jnp.take_along_axis(
      k, jnp.broadcast_to(channels, k.shape[:2] + channels.shape), -1)
  positions, counts = select_tokens(q, labels.transpose(0, 2, 1, 3), channels,
                                    lengths, token_budget=token_budget,
                                    token_fraction=token_fraction,
                                    per_head=per_head)
  vis = selection.positions_visible(positions, counts, k.shape[1],
                                    q.shape[1])
  return selection.dense_attention(q, k, v, vis, scale)
