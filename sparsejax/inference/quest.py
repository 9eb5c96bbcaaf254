"""Quest (Tang et al., ICML 2024): query-aware page selection for decode.

Each KV page keeps the channel-wise min m and max M of its keys
(`PagedKVCache(page_bounds=True)`). The query's upper bound on any key of a
page is sum_i max(q_i m_i, q_i M_i) = relu(q) . M + min(q, 0) . m: two
GEMVs over the metadata instead of an elementwise max. The top
`token_budget / page` pages per (sequence, kv head) are attended, the page
holding the current token always among them ("page budget including the last
page"), through the same split-KV paged kernel as dense decode, with the
selected page ids as its list. Bytes read per step: the metadata (2 / page of
the keys) plus the selected fraction of K and V.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from sparsejax.inference import selection
from sparsejax.inference.paged_cache import PagedKVCache
from sparsejax.inference.paged_decode import paged_decode_attention


def upper_bounds(q, page_min, page_max):
  """q [B, H, D], page_min/max [B, Hkv, W, D] -> [B, H, W] f32 bounds."""
  b, h, d = q.shape
  hkv = page_min.shape[1]
  qg = q.reshape(b, hkv, h // hkv, d).astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  ub = (jnp.einsum("bgrd,bgwd->bgrw", jnp.maximum(qg, 0),
                   page_max.astype(jnp.float32), precision=hp) +
        jnp.einsum("bgrd,bgwd->bgrw", jnp.minimum(qg, 0),
                   page_min.astype(jnp.float32), precision=hp))
  return ub.reshape(b, h, -1)


def select_pages(q, page_min, page_max, lengths, *, page_size: int,
                 token_budget: int, per_head: bool = False):
  """(logical pages [B, Hl, K], counts [B, Hl]) that Quest attends."""
  hkv = page_min.shape[1]
  budget = max(1, token_budget // page_size)
  ub = selection.reduce_group(upper_bounds(q, page_min, page_max), hkv,
                              per_head)
  ub = selection.mask_positions(ub, lengths, page_size)
  last = jnp.maximum(-(-lengths // page_size) - 1, 0)
  is_last = jnp.arange(ub.shape[-1])[None, None] == last[:, None, None]
  ub = jnp.where(is_last & (lengths > 0)[:, None, None], jnp.inf, ub)
  counts = jnp.broadcast_to(selection.budget_count(lengths, budget,
                                                   page_size)[:, None],
                            ub.shape[:2])
  return selection.top_k_sorted(ub, counts, budget), counts


def quest_decode(q, cache: PagedKVCache, *, token_budget: int,
                 per_head: bool = False, scale: Optional[float] = None,
                 impl: str = "auto", interpret: bool = False, tuning=None):
  """Decode attention of q [B, H, D] over Quest's selected pages."""
  if cache.page_min is None:
    raise ValueError("quest_decode needs a cache made with "
                     "PagedKVCache.create(..., page_bounds=True)")
  logical, counts = select_pages(
      q, cache.page_min, cache.page_max, cache.lengths,
      page_size=cache.page_size, token_budget=token_budget,
      per_head=per_head)
  return paged_decode_attention(
      q, cache.k_pages, cache.v_pages, cache.page_lists(logical, counts),
      scale=scale, impl=impl, interpret=interpret, tuning=tuning)


def quest_reference(q, k, v, lengths, *, page_size: int, token_budget: int,
                    per_head: bool = False, scale: Optional[float] = None):
  """The definition over a dense cache k, v [B, N, Hkv, D] (lengths [B])."""
  b, n, hkv, d = k.shape
  scale = d ** -0.5 if scale is None else scale
  w = -(-n // page_size)
  kp = jnp.pad(k, ((0, 0), (0, w * page_size - n), (0, 0), (0, 0)))
  kp = kp.reshape(b, w, page_size, hkv, d)
  valid = (jnp.arange(w * page_size) < lengths[:, None]).reshape(
      b, w, page_size, 1, 1)
  lo = jnp.where(valid, kp, jnp.inf).min(2).transpose(0, 2, 1, 3)
  hi = jnp.where(valid, kp, -jnp.inf).max(2).transpose(0, 2, 1, 3)
  empty = ~jnp.isfinite(lo)
  logical, counts = select_pages(
      q, jnp.where(empty, 0, lo), jnp.where(empty, 0, hi), lengths,
      page_size=page_size, token_budget=token_budget, per_head=per_head)
  pages = selection.positions_visible(logical, counts, w, q.shape[1])
  vis = jnp.repeat(pages, page_size, axis=-1)[..., :n] & (
      jnp.arange(n)[None, None] < lengths[:, None, None])
  return selection.dense_attention(q, k, v, vis, scale)
