"""Mask constructors against brute-force numpy definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax.block_sparse.block_mask import EMPTY, FULL, PARTIAL


def _dense(mask):
  return np.asarray(mask.to_dense())


def _dkernel_s2(n_blocks, num_heads, *, local, stride, num_kv_heads=None,
                homo=False, dense_heads=0, offset=0):
  """DKernel's get_sparse_attn_mask (causal, absolute), restated in numpy."""
  hkv = num_kv_heads or num_heads
  step = max(1, stride // num_heads)
  out = np.zeros((num_heads, n_blocks, n_blocks), bool)
  for h in range(num_heads):
    g = h // (num_heads // hkv)
    gg = 0 if homo else g
    for i in range(n_blocks):
      for j in range(i + 1):
        vert = (j + gg * step + offset) % stride == 0
        out[h, i, j] = (g >= hkv - dense_heads) or (i - j < local) or vert
  return out


@pytest.mark.parametrize("q_len,kv_len,bs", [(100, 100, 32), (64, 200, 16),
                                             (257, 130, 64)])
def test_causal_and_sliding_match_brute_force(q_len, kv_len, bs):
  qi = np.arange(q_len)[:, None]
  ki = np.arange(kv_len)[None, :]
  np.testing.assert_array_equal(
      _dense(sj.masks.causal(q_len, kv_len, block_size=bs))[0, 0], ki <= qi)
  np.testing.assert_array_equal(
      _dense(sj.masks.sliding_window(q_len, 37, kv_len=kv_len,
                                     block_size=bs))[0, 0],
      (qi - ki >= 0) & (qi - ki < 37))
  np.testing.assert_array_equal(
      _dense(sj.masks.sliding_window(q_len, 37, kv_len=kv_len, causal=False,
                                     block_size=bs))[0, 0],
      np.abs(qi - ki) < 37)


def test_block_states_are_tight():
  """Full blocks are all visible, empty ones all hidden, partial ones mixed."""
  m = sj.masks.sliding_window(300, 50, block_size=32)
  dense = _dense(m)[0, 0]
  states = np.asarray(m.block_states())[0, 0]
  for i in range(states.shape[0]):
    for j in range(states.shape[1]):
      blk = dense[i * 32:(i + 1) * 32, j * 32:(j + 1) * 32]
      want = FULL if blk.all() else (EMPTY if not blk.any() else PARTIAL)
      assert states[i, j] == want, (i, j)


@pytest.mark.parametrize("kw", [
    dict(num_heads=4, local=2, stride=3),
    dict(num_heads=8, local=3, stride=4, num_kv_heads=2),
    dict(num_heads=4, local=1, stride=8, offset=1),
    dict(num_heads=4, local=2, stride=3, homo=True),
    dict(num_heads=4, local=2, stride=4, num_kv_heads=4, dense_heads=1),
])
def test_s2_matches_dkernel_pattern(kw):
  n, bs = 10, 16
  m = sj.masks.s2(n * bs, kw["num_heads"], block_size=bs,
                  local_blocks=kw["local"], vert_stride=kw["stride"],
                  num_kv_heads=kw.get("num_kv_heads"),
                  homo_head=kw.get("homo", False),
                  num_dense_heads=kw.get("dense_heads", 0),
                  head_sliding_offset=kw.get("offset", 0))
  want_blocks = _dkernel_s2(n, **kw)
  states = np.asarray(m.block_states())[0]  # [H|1, n, n]
  if kw.get("homo"):
    want_blocks = want_blocks[:1]
  np.testing.assert_array_equal(states != EMPTY, want_blocks)
  # Token level: the block pattern, causal inside diagonal blocks.
  tok = np.kron(want_blocks, np.ones((1, bs, bs), bool))
  tok &= np.tril(np.ones((n * bs, n * bs), bool))
  np.testing.assert_array_equal(_dense(m)[0], tok)


def test_s2_dkernel_golden_homo():
  """DKernel tests/test_utils.py: local 2, stride 3, homo, 8 blocks."""
  m = sj.masks.s2(8 * 16, 1, block_size=16, local_blocks=2, vert_stride=3,
                  homo_head=True)
  got = np.asarray(m.block_states())[0, 0] != EMPTY
  want = np.tril(np.ones((8, 8), bool)) & (
      (np.subtract.outer(np.arange(8), np.arange(8)) < 2) |
      (np.arange(8)[None, :] % 3 == 0))
  np.testing.assert_array_equal(got, want)
  assert got[7].nonzero()[0].tolist() == [0, 3, 6, 7]


def test_s2_union_covers_and_warns_on_gaps(caplog):
  m = sj.masks.s2(64 * 16, 8, block_size=16, local_blocks=2, vert_stride=8)
  assert sj.masks.s2_coverage(m)["covers_all"]
  with caplog.at_level("WARNING"):
    m = sj.masks.s2(64 * 16, 2, block_size=16, local_blocks=2, vert_stride=8)
  assert not sj.masks.s2_coverage(m)["covers_all"]
  assert "unattended" in caplog.text


def test_s2_bidirectional_relative_rule():
  m = sj.masks.s2(8 * 16, 2, block_size=16, local_blocks=(1, 1),
                  vert_stride=3, causal=False)
  i, j = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
  d = np.maximum(0, i - j) + np.maximum(0, j - i)
  np.testing.assert_array_equal(np.asarray(m.block_states())[0, 0] != EMPTY,
                                d % 3 == 0)


@pytest.mark.parametrize("kw,match", [
    (dict(vert_stride=0), "vert_stride"),
    (dict(local_blocks=0), "local_blocks"),
    (dict(num_kv_heads=3), "divisible"),
    (dict(block_size=48), "power of two"),
    (dict(block_size=8), "power of two"),
    (dict(homo_head=True, num_dense_heads=1), "homo_head"),
])
def test_s2_rejects_contradictions(kw, match):
  with pytest.raises(ValueError, match=match):
    sj.masks.s2(256, 4, **{"block_size": 16, **kw})


def test_from_mask_fn_per_batch_and_head():
  fn = sj.mask_fns.HashedRandom(7, 1, 3)
  m = sj.masks.from_mask_fn(fn, q_len=70, kv_len=90, batch=2, num_heads=3,
                            block_size=16)
  b, h, q, k = np.meshgrid(np.arange(2), np.arange(3), np.arange(70),
                           np.arange(90), indexing="ij")
  np.testing.assert_array_equal(_dense(m), np.asarray(fn(b, h, q, k)))


def test_from_mask_fn_long_context_is_blockwise():
  """128K tokens: no 128K x 128K matrix (17 GB as bools) is built."""
  m = sj.masks.from_mask_fn(sj.mask_fns.SlidingWindow(2048), q_len=131072,
                            block_size=128)
  ref = sj.masks.sliding_window(131072, 2048, block_size=128)
  np.testing.assert_array_equal(np.asarray(m.block_states()),
                                np.asarray(ref.block_states()))
  assert int(m.full_counts[0, 0, -1]) == 15 and int(
      m.partial_counts[0, 0, -1]) == 2


def test_lists_are_sorted_and_transposed_consistently():
  m = sj.masks.s2(30 * 16, 4, block_size=16, local_blocks=3, vert_stride=4)
  states = np.asarray(m.block_states())
  for kind, value in (("full", FULL), ("partial", PARTIAL)):
    cnt = np.asarray(getattr(m, f"{kind}_counts"))
    idx = np.asarray(getattr(m, f"{kind}_idx"))
    cnt_t = np.asarray(getattr(m, f"{kind}_counts_t"))
    idx_t = np.asarray(getattr(m, f"{kind}_idx_t"))
    for h in range(4):
      for i in range(30):
        row = idx[0, h, i, :cnt[0, h, i]]
        assert list(row) == sorted(row)
        np.testing.assert_array_equal(row, np.nonzero(states[0, h, i] ==
                                                      value)[0])
        col = idx_t[0, h, i, :cnt_t[0, h, i]]
        np.testing.assert_array_equal(col, np.nonzero(states[0, h, :, i] ==
                                                      value)[0])


def test_from_block_mask_under_jit_top_k():
  """Data-dependent lists: top-k block selection computed inside jit."""
  @jax.jit
  def build(scores):
    kth = jnp.sort(scores, -1)[..., -2][..., None]
    return sj.masks.from_block_mask(scores >= kth, block_size=16)

  scores = jax.random.normal(jax.random.key(0), (1, 2, 5, 5))
  m = build(scores)
  assert (np.asarray(m.full_counts) == 2).all()
  np.testing.assert_array_equal(
      np.asarray(m.block_states()) == FULL,
      np.asarray(scores >= jnp.sort(scores, -1)[..., -2][..., None]))


def test_and_or_semantics():
  a = sj.masks.sliding_window(96, 20, block_size=16)
  b = sj.masks.s2(96, 2, block_size=16, local_blocks=1, vert_stride=3)
  np.testing.assert_array_equal(_dense(a | b), _dense(a) | _dense(b))
  np.testing.assert_array_equal(_dense(a & b), _dense(a) & _dense(b))
  c = sj.masks.from_block_mask(np.eye(6, dtype=bool), block_size=16)
  np.testing.assert_array_equal(_dense(a | c), _dense(a) | _dense(c))
  with pytest.raises(ValueError, match="geometry"):
    _ = a | sj.masks.causal(96, block_size=32)
  inexact = sj.masks.from_block_mask(np.eye(6, dtype=bool), block_size=16,
                                     mask_fn=sj.mask_fns.Causal())
  with pytest.raises(ValueError, match="exactly"):
    _ = a | inexact


def test_block_mask_is_a_pytree_through_jit():
  m = sj.masks.causal(64, block_size=16)
  m2 = jax.jit(lambda x: x)(m)
  np.testing.assert_array_equal(_dense(m), _dense(m2))
  assert m2.mask_fn == m.mask_fn
