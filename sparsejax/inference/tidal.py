"""TidalDecode (Yang et al., ICLR 2025): position-persistent sparse decode.

A few token-selection layers run full attention and keep the top
`token_budget` tokens by logit q . k; every other sparse layer attends only
those positions ("position persistent": the same positions reused across
layers, each layer with its own K and V). The first layers stay dense.
Defaults of the official Llama-3 example: layers 0-1 dense, selection at
layer 2 and a correction re-selection at layer 13, top-k 128..2048.

A selection layer is one pass of the paged kernel over the dense page list
with `return_scores=True`: the attention output and, per list head, the
group-max logits of every cached token (no second read of K). Positions are
per (sequence, kv head) by default; per_head=True keeps them per q head.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from sparsejax.inference import selection
from sparsejax.inference.paged_cache import PagedKVCache, token_view
from sparsejax.inference.paged_decode import expand_lists
from sparsejax.inference.paged_decode import paged_decode_attention


def tidal_select(q, cache: PagedKVCache, *, token_budget: int,
                 per_head: bool = False, scale: Optional[float] = None,
                 impl: str = "auto", interpret: bool = False, tuning=None):
  """Full attention plus selection: (out [B, H, D], positions, counts)."""
  b, h, _ = q.shape
  hl = h if per_head else cache.num_kv_heads
  lists = expand_lists(cache.dense_lists(), hl)
  out, scores = paged_decode_attention(
      q, cache.k_pages, cache.v_pages, lists, scale=scale, impl=impl,
      interpret=interpret, tuning=tuning, return_scores=True)
  scores = selection.mask_positions(scores, cache.lengths)
  counts = jnp.broadcast_to(selection.budget_count(cache.lengths,
                                                   token_budget)[:, None],
                            (b, hl))
  return out, selection.top_k_sorted(scores, counts, token_budget), counts


def tidal_reuse(q, cache: PagedKVCache, positions, counts, *,
                scale: Optional[float] = None, impl: str = "auto",
                interpret: bool = False, tuning=None):
  """Attention of q over the positions a selection layer chose."""
  return paged_decode_attention(
      q, token_view(cache.k_pages), token_view(cache.v_pages),
      cache.token_lists(positions, counts), scale=scale, impl=impl,
      interpret=interpret, tuning=tuning)


def tidal_reference(q_sel, k_sel, q, k, v, lengths, *, token_budget: int,
                    per_head: bool = False, scale: Optional[float] = None):
  """The definition: positions from the selection layer's q_sel [B, H, D]
  and k_sel [B, N, Hkv, D] (top-k of q_sel . k_sel, group max), attention of
  this layer's q, k, v over them."""
  b, n, hkv, d = k.shape
  scale = d ** -0.5 if scale is None else scale
  g = q.shape[1] // hkv
  logits = jnp.einsum("bhd,bnhd->bhn", q_sel.astype(jnp.float32),
                      jnp.repeat(k_sel, g, axis=2).astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) * scale
  s = selection.mask_positions(selection.reduce_group(logits, hkv, per_head),
                               lengths)
  counts = jnp.broadcast_to(selection.budget_count(lengths, token_budget)[
      :, None], s.shape[:2])
  positions = selection.top_k_sorted(s, counts, token_budget)
  vis = selection.positions_visible(positions, counts, n, q.shape[1])
  return selection.dense_attention(q, k, v, vis, scale)
