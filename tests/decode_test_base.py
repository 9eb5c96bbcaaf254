"""One decode suite, run against every implementation (test_decode_paged.py).

Each case fills a paged cache (ragged lengths, pages handed out in random
order, GQA), builds a visit list the way a decode path does (dense page
lists, Quest-style selected pages per kv head, token lists per q head over
the token view) and checks `paged_decode_attention` and its group-max scores
against a float64 dense reference computed from the cache's logical K/V.
"""

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.inference import paged_decode
from sparsejax.inference.paged_cache import PagedKVCache
from sparsejax.inference.paged_cache import token_view

TOLERANCES = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True)
class DecodeCase:
  name: str
  lengths: tuple  # per sequence; 0 = empty
  heads: int
  kv_heads: int
  head_dim: int
  page: int
  lists: str  # "dense" | "pages" | "tokens"
  max_len: int = 96
  per_head: bool = False  # tokens: one list per q head


CASES = [
    DecodeCase("dense_ragged_gqa", (5, 96, 37), 4, 2, 16, 8, "dense"),
    DecodeCase("dense_mha_one_page", (3, 8), 2, 2, 32, 8, "dense"),
    DecodeCase("dense_mqa_with_empty_sequence", (0, 50, 17), 4, 1, 16, 16,
               "dense"),
    DecodeCase("selected_pages_per_kv_head", (70, 33, 96), 4, 2, 16, 8,
               "pages"),
    DecodeCase("tokens_per_q_head", (70, 9, 96), 4, 2, 16, 8, "tokens",
               per_head=True),
    DecodeCase("tokens_per_kv_head_page1", (41, 96), 8, 2, 16, 1, "tokens"),
]
BY_NAME = {c.name: c for c in CASES}
_EMPTY = "dense_mqa_with_empty_sequence"


@functools.lru_cache(maxsize=None)
def make_cache(case: DecodeCase, dtype, seed=0):
  """(filled cache, q) of a case; shared by the implementation classes."""
  b = len(case.lengths)
  # numpy draws: eager jax.random compiles per shape (seconds on CI).
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  shape = (b, case.max_len, case.kv_heads, case.head_dim)
  k, v = normal(*shape), normal(*shape)
  cache = PagedKVCache.create(b, case.max_len, case.kv_heads, case.head_dim,
                              dtype, page_size=case.page,
                              shuffle_key=jax.random.key(seed + 7))
  q = normal(b, case.heads, case.head_dim)
  return cache.prefill(k, v, np.asarray(case.lengths)), q


def make_lists(case: DecodeCase, cache: PagedKVCache, seed=0):
  """(pool k, pool v, lists, visible bool [B, H, max_len]) of a case."""
  lens = np.asarray(case.lengths)
  b, h, hkv = len(lens), case.heads, case.kv_heads
  rng = np.random.default_rng(seed)
  if case.lists == "dense":
    vis = np.arange(case.max_len)[None, None] < lens[:, None, None]
    return (cache.k_pages, cache.v_pages, cache.dense_lists(),
            np.broadcast_to(vis, (b, h, case.max_len)))
  if case.lists == "pages":  # a random subset of each kv head's pages
    npages = -(-lens // case.page)
    k = 4
    logical = np.zeros((b, hkv, k), np.int32)
    counts = np.minimum(npages, k)[:, None].repeat(hkv, 1)
    vis = np.zeros((b, h, case.max_len), bool)
    for i in range(b):
      for g in range(hkv):
        pick = np.sort(rng.choice(npages[i], counts[i, g], replace=False))
        logical[i, g, :len(pick)] = pick
        for p in pick:
          lo, hi = p * case.page, min((p + 1) * case.page, lens[i])
          vis[i, g * (h // hkv):(g + 1) * (h // hkv), lo:hi] = True
    lists = cache.page_lists(jnp.asarray(logical), jnp.asarray(counts))
    return cache.k_pages, cache.v_pages, lists, vis
  hl = h if case.per_head else hkv
  k = 12
  pos = np.zeros((b, hl, k), np.int32)
  counts = np.minimum(lens, k)[:, None].repeat(hl, 1)
  vis = np.zeros((b, h, case.max_len), bool)
  for i in range(b):
    for g in range(hl):
      pick = np.sort(rng.choice(lens[i], counts[i, g], replace=False))
      pos[i, g, :len(pick)] = pick
      rows = [g] if case.per_head else range(g * (h // hkv),
                                              (g + 1) * (h // hkv))
      for r in rows:
        vis[i, r, pick] = True
  lists = cache.token_lists(jnp.asarray(pos), jnp.asarray(counts))
  return token_view(cache.k_pages), token_view(cache.v_pages), lists, vis


def dense_reference(q, cache: PagedKVCache, vis, scale):
  """float64 masked softmax over the cache's logical K/V (numpy)."""
  k, v = (np.asarray(x, np.float64) for x in cache.dense_kv())
  q = np.asarray(q, np.float64)
  b, h, d = q.shape
  g = h // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum("bhd,bnhd->bhn", q, k) * scale
  s = np.where(vis, s, -np.inf)
  m = np.where(vis.any(-1, keepdims=True), s.max(-1, keepdims=True), 0.0)
  p = np.where(vis, np.exp(s - m), 0.0)
  den = p.sum(-1, keepdims=True)
  out = np.einsum("bhn,bnhd->bhd", p / np.where(den > 0, den, 1.0), v)
  return out, s


def assert_close(name, got, want, tol):
  got = np.asarray(got, np.float64)
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(got - want).max()) / scale
  assert err <= tol, f"{name}: normalised max error {err:.3g} > {tol:.3g}"


class DecodeSuite:
  """Subclass with IMPL (and INTERPRET) set to run the suite."""
  IMPL: str = ""
  INTERPRET: bool = False
  TUNING: Optional[Callable] = None  # () -> tuning for this implementation

  def run(self, q, k, v, lists, **kw):
    if self.INTERPRET:
      kw["interpret"] = True
    if self.TUNING is not None:
      kw["tuning"] = type(self).TUNING()
    return jax.jit(functools.partial(paged_decode.paged_decode_attention,
                                     impl=self.IMPL, **kw))(q, k, v, lists)

  def check(self, case, dtype, scores=False):
    cache, q = make_cache(case, dtype)
    k, v, lists, vis = make_lists(case, cache)
    scale = case.head_dim ** -0.5
    want, logits = dense_reference(q, cache, vis, scale)
    got = self.run(q, k, v, lists, return_scores=scores)
    if scores:
      got, sc = got
      self.check_scores(case, sc, logits, lists, vis, TOLERANCES[dtype])
    assert got.dtype == q.dtype and got.shape == q.shape
    assert_close("out", got, want, TOLERANCES[dtype])
    return got

  def check_scores(self, case, sc, logits, lists, vis, tol):
    """Scores by list slot: the group max of the listed tokens' logits."""
    b, hl, _ = lists.pages.shape
    hg = case.heads if hl == case.heads else case.kv_heads
    rows = case.heads // hg
    page = case.page if case.lists != "tokens" else 1
    sc = np.asarray(sc)
    assert sc.shape == (b, hg, lists.pages.shape[-1] * page)
    lists = paged_decode.expand_lists(lists, hg)
    slot = np.arange(sc.shape[-1])
    pos = np.asarray(lists.logical)[..., slot // page] * page + slot % page
    listed = (slot // page)[None, None] < np.asarray(lists.counts)[..., None]
    listed &= pos < np.asarray(lists.limits)[..., None]
    lg = np.where(vis, logits, -np.inf).reshape(b, hg, rows, -1).max(2)
    want = np.take_along_axis(lg, np.minimum(pos, lg.shape[-1] - 1), -1)
    want = np.where(listed, want, -np.inf)
    np.testing.assert_array_equal(np.isfinite(sc), np.isfinite(want))
    fin = np.isfinite(want)
    assert_close("scores", sc[fin], want[fin], tol)

  CASE_NAMES = tuple(BY_NAME)  # subclasses may run a subset

  # (dense_mqa_with_empty_sequence: test_empty_sequence_gives_zeros.)
  @pytest.mark.parametrize("name", [n for n in BY_NAME if n != _EMPTY])
  def test_matches_reference_f32(self, name):
    if name not in self.CASE_NAMES:
      pytest.skip(f"{type(self).__name__} runs {self.CASE_NAMES} (CI time)")
    self.check(BY_NAME[name], jnp.float32)

  @pytest.mark.parametrize("name", ["dense_ragged_gqa",
                                    "tokens_per_kv_head_page1"])
  def test_matches_reference_bf16(self, name):
    self.check(BY_NAME[name], jnp.bfloat16)

  @pytest.mark.parametrize("name", ["dense_ragged_gqa", "tokens_per_q_head"])
  def test_scores_are_group_max_logits(self, name):
    self.check(BY_NAME[name], jnp.float32, scores=True)

  def test_empty_sequence_gives_zeros(self):
    out = self.check(BY_NAME[_EMPTY], jnp.float32)
    assert np.all(np.asarray(out)[0] == 0) and np.isfinite(out).all()

  def test_entries_past_the_count_are_not_attended(self):
    # Padding entries name real pages at visible positions: only counts
    # keeps them out.
    case = BY_NAME["selected_pages_per_kv_head"]
    cache, q = make_cache(case, jnp.float32)
    k, v, lists, vis = make_lists(case, cache)
    past = jnp.arange(lists.pages.shape[-1]) >= lists.counts[..., None]
    lists = lists._replace(
        pages=jnp.where(past, lists.pages[..., :1], lists.pages),
        logical=jnp.where(past, lists.logical[..., :1], lists.logical))
    want, _ = dense_reference(q, cache, vis, case.head_dim ** -0.5)
    assert_close("out", self.run(q, k, v, lists), want,
                 TOLERANCES[jnp.float32])
