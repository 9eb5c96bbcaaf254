"""The paged KV cache: contents, page allocation, metadata and overflow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.inference.paged_cache import PagedKVCache

B, HKV, D, PAGE = 3, 2, 8, 4


def _kv(seed, length):
  # numpy draws: eager jax.random compiles per shape (seconds on CI).
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(B, length, HKV, D)), jnp.float32)
               for _ in range(2))


def _check_pages_disjoint(cache):
  owned = []
  for b in range(B):
    n = -(-int(cache.lengths[b]) // PAGE)
    owned += np.asarray(cache.page_table[b, :n]).tolist()
  free = np.asarray(cache.free[:int(cache.num_free)]).tolist()
  assert len(set(owned)) == len(owned)
  assert sorted(owned + free) == list(range(cache.k_pages.shape[1]))


def test_prefill_then_append_keeps_every_token_in_logical_order():
  k, v = _kv(0, 30)
  lens = np.array([3, 30, 12])
  cache = PagedKVCache.create(B, 32, HKV, D, jnp.float32, page_size=PAGE,
                              page_bounds=True, channels=[[1, 5], [0, 7]],
                              shuffle_key=jax.random.key(1))
  cache = cache.prefill(k[:, :20], v[:, :20], np.minimum(lens, 20))
  append = jax.jit(lambda c, a, b: c.append(a, b))
  for _ in range(10):
    pos = np.asarray(cache.lengths)
    rows = np.minimum(pos, 29)
    cache = append(cache, k[np.arange(B), rows], v[np.arange(B), rows])
  np.testing.assert_array_equal(cache.lengths, [13, 30, 22])
  np.testing.assert_array_equal(cache.overflowed, [False] * 3)
  _check_pages_disjoint(cache)
  kd, vd = cache.dense_kv()
  for b, n in enumerate(np.asarray(cache.lengths)):
    want = np.concatenate([k[b, :min(lens[b], 20)],
                           k[b, np.minimum(np.arange(min(lens[b], 20), n),
                                           29)]])
    np.testing.assert_array_equal(kd[b, :n], want)
    # Quest metadata: min / max of each page's keys; labels: the channels.
    for p in range(-(-n // PAGE)):
      page = want[p * PAGE:(p + 1) * PAGE]
      np.testing.assert_array_equal(cache.page_min[b, :, p], page.min(0))
      np.testing.assert_array_equal(cache.page_max[b, :, p], page.max(0))
    np.testing.assert_array_equal(cache.labels[b, 0, :n], want[:, 0, [1, 5]])
    np.testing.assert_array_equal(cache.labels[b, 1, :n], want[:, 1, [0, 7]])
  del vd


def test_pages_come_from_one_pool_and_release_returns_them():
  k, v = _kv(1, 16)
  cache = PagedKVCache.create(B, 16, HKV, D, jnp.float32, page_size=PAGE,
                              num_pages=7)  # fewer than B * 4 pages
  cache = cache.prefill(k, v, np.array([16, 5, 0]))  # 4 + 2 + 0 pages
  assert int(cache.num_free) == 1
  _check_pages_disjoint(cache)
  cache = cache.release(np.array([True, False, False]))
  assert int(cache.num_free) == 5 and int(cache.lengths[0]) == 0
  _check_pages_disjoint(cache)
  # Sequences 0 and 2 now grow into the freed pages: all 7 in use.
  for i in range(6):
    cache = cache.append(k[:, i], v[:, i])
  _check_pages_disjoint(cache)
  np.testing.assert_array_equal(cache.lengths, [6, 11, 6])
  assert int(cache.num_free) == 0
  np.testing.assert_array_equal(cache.dense_kv()[0][2, :6], k[2, :6])


def test_overflow_raises_eagerly_and_is_dropped_and_flagged_under_jit():
  k, v = _kv(2, 8)
  one = jnp.ones((B, HKV, D))
  cache = PagedKVCache.create(B, 8, HKV, D, jnp.float32, page_size=PAGE)
  cache = cache.prefill(k, v, np.array([8, 7, 4]))
  with pytest.raises(ValueError, match="full.*\\[0\\].*max_len=8"):
    cache.append(one, one)
  with pytest.raises(ValueError, match="exceeds the cache's max_len"):
    cache.prefill(jnp.zeros((B, 9, HKV, D)), jnp.zeros((B, 9, HKV, D)),
                  np.array([1, 1, 1]))
  with pytest.raises(ValueError, match="lengths must be"):
    cache.prefill(k, v, np.array([9, 1, 1]))
  before = cache
  cache = jax.jit(lambda c: c.append(one, one))(cache)
  np.testing.assert_array_equal(cache.lengths, [8, 8, 5])
  np.testing.assert_array_equal(cache.overflowed, [True, False, False])
  # Nothing of sequence 0 changed; nothing else was overwritten.
  np.testing.assert_array_equal(cache.dense_kv()[0][0], before.dense_kv()[0][0])
  with pytest.raises(ValueError, match="dropped for sequences \\[0\\]"):
    cache.raise_if_overflowed()


def test_an_exhausted_pool_raises_eagerly_and_drops_under_jit():
  k, v = _kv(3, 8)
  one = jnp.ones((B, HKV, D))
  cache = PagedKVCache.create(B, 8, HKV, D, jnp.float32, page_size=PAGE,
                              num_pages=4)
  with pytest.raises(ValueError, match="need 5 pages, the pool has 4"):
    cache.prefill(k, v, np.array([8, 4, 5]))
  cache = cache.prefill(k, v, np.array([4, 4, 4]))  # 3 pages, 1 free
  with pytest.raises(ValueError, match="out of pages: 3 sequences"):
    cache.append(one, one)
  pool = cache.k_pages
  cache = jax.jit(lambda c: c.append(one, one))(cache)
  # The first sequence gets the last page; the others are dropped.
  np.testing.assert_array_equal(cache.lengths, [5, 4, 4])
  np.testing.assert_array_equal(cache.overflowed, [False, True, True])
  assert int(cache.num_free) == 0
  changed = np.asarray((cache.k_pages != pool).any((0, 2, 3)))
  assert changed.sum() == 1  # one page written, one row of it


def test_bad_arguments_name_what_is_wrong():
  with pytest.raises(ValueError, match="page_size must be a positive int"):
    PagedKVCache.create(1, 8, 1, 8, jnp.float32, page_size=0)
  with pytest.raises(ValueError, match="channels must be int"):
    PagedKVCache.create(1, 8, 2, 8, jnp.float32, channels=[[0, 1]])
  with pytest.raises(ValueError, match="channels must lie in"):
    PagedKVCache.create(1, 8, 1, 8, jnp.float32, channels=[[0, 8]])
  cache = PagedKVCache.create(2, 8, 1, 8, jnp.float32)
  with pytest.raises(ValueError, match="k_new and v_new must be"):
    cache.append(jnp.ones((2, 2, 8)), jnp.ones((2, 2, 8)))
  with pytest.raises(ValueError, match="which must be bool"):
    cache.release(np.array([True]))
