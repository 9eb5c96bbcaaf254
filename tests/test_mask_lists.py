"""BlockMask straight from index lists: `sorted_lists`, `transpose_lists`
and `BlockMask.from_lists` against `compress` / `from_states` (traced and
concrete), masks through attention, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax.block_sparse import block_mask as bm
from sparsejax.block_sparse.block_mask import BlockMask, EMPTY, FULL, PARTIAL


def assert_well_formed(mask: BlockMask):
  """Lists sorted, unique, padded with the last entry (0 when empty), and
  each transposed list the exact transpose of its forward list."""
  for suffix in ("full", "partial"):
    c, i, ct, it = (np.asarray(getattr(mask, f"{suffix}_{f}")) for f in
                    ("counts", "idx", "counts_t", "idx_t"))
    fwd = np.zeros(i.shape[:3] + (ct.shape[-1],), bool)
    back = np.zeros(it.shape[:3] + (c.shape[-1],), bool)
    for lists, counts, out in ((i, c, fwd), (it, ct, back)):
      for pos in np.ndindex(counts.shape):
        row = lists[pos][:counts[pos]]
        assert (np.diff(row) > 0).all(), (suffix, pos, row)
        pad = row[-1] if row.size else 0
        assert (lists[pos][counts[pos]:] == pad).all(), (suffix, pos)
        out[pos][row] = True
    np.testing.assert_array_equal(fwd, np.swapaxes(back, -1, -2))


# Jitted: eager block_states / to_dense dispatch (and compile) op by op.
block_states = jax.jit(lambda m: m.block_states())
to_dense = jax.jit(lambda m: m.to_dense())


def _random_member(shape, seed, p=0.3):
  # numpy data: eager jax.random compiles its kernels (seconds on CPU).
  return np.random.default_rng(seed).random(shape) < p


def test_sorted_lists_match_compress():
  member = _random_member((2, 3, 7, 11), 0)
  member[0, 0, 0] = False  # an empty row
  want_c, want_i = (np.asarray(x) for x in bm.compress(member, width=11))
  rng = np.random.default_rng(1)
  for unique in (True, False):
    # Candidates: every index once (unique) or twice, shuffled, the
    # non-members invalid.
    cand = np.tile(np.arange(11), (2, 3, 7, 1 if unique else 2))
    perm = np.argsort(rng.random(cand.shape), -1)
    cand = np.take_along_axis(cand, perm, -1)
    valid = np.take_along_axis(member, cand, -1)
    got = jax.jit(lambda c, v, u=unique: [
        bm.sorted_lists(c, v, w, unique=u) for w in (11, 4)])(cand, valid)
    np.testing.assert_array_equal(got[0][0], want_c)
    np.testing.assert_array_equal(got[0][1], want_i)
    # Narrower than a row: its first `width` entries.
    c4, i4 = (np.asarray(x) for x in got[1])
    np.testing.assert_array_equal(c4, np.minimum(want_c, 4))
    listed = np.arange(4) < c4[..., None]
    np.testing.assert_array_equal(np.where(listed, i4, -1),
                                  np.where(listed, want_i[..., :4], -1))


def test_transpose_lists_match_compress_of_the_transpose():
  member = _random_member((2, 1, 9, 6), 2, p=0.4)
  member[1, 0, :, 3] = False  # an empty column
  counts, idx = bm.compress(member, width=6)
  want_c, want_i = bm.compress(np.swapaxes(member, -1, -2), width=9)
  got_c, got_i = jax.jit(lambda c, i: bm.transpose_lists(c, i, 6))(counts,
                                                                   idx)
  np.testing.assert_array_equal(got_c, want_c)
  np.testing.assert_array_equal(got_i, want_i)


def _states(seed, shape=(2, 3, 5, 7)):
  member = _random_member(shape, seed, p=0.5)
  part = _random_member(shape, seed + 1, p=0.3) & member
  return np.where(part, PARTIAL, np.where(member, FULL, EMPTY)).astype(
      np.int8)


def _lists_of(states, value, width=None):
  return bm.compress(states == value, width=width)


def test_from_lists_equals_from_states_traced():
  states = _states(3)
  band = sj.mask_fns.Band(lo=-20, hi=20)
  want = BlockMask.from_states(states, block_q=16, block_kv=16, q_len=70,
                               kv_len=100, mask_fn=band)

  @jax.jit
  def build(states):
    fc, fi = bm.compress_traced(states == FULL)
    pc, pi = bm.compress_traced(states == PARTIAL)
    return BlockMask.from_lists(fc, fi, pc, pi, block_q=16, block_kv=16,
                                q_len=70, kv_len=100, mask_fn=band,
                                mask_fn_exact=True)

  got = build(states)
  np.testing.assert_array_equal(block_states(got), block_states(want))
  np.testing.assert_array_equal(to_dense(got), to_dense(want))
  assert got.mask_fn_exact
  assert_well_formed(got)
  # Without partial lists or a mask_fn: every listed block is full.
  fc, fi = _lists_of(states, FULL)
  plain = jax.jit(lambda fc, fi: BlockMask.from_lists(
      fc, fi, block_q=16, block_kv=16, q_len=70, kv_len=100, width=9,
      width_t=8))(fc, fi)
  assert plain.full_idx.shape[-1] == 9 and plain.full_idx_t.shape[-1] == 8
  np.testing.assert_array_equal(block_states(plain) == FULL,
                                states == FULL)
  assert_well_formed(plain)


def test_from_lists_errors():
  c, i = jnp.zeros((1, 1, 4), jnp.int32), jnp.zeros((1, 1, 4, 2), jnp.int32)
  geo = dict(block_q=16, block_kv=16, q_len=64, kv_len=64)
  with pytest.raises(ValueError, match="mask_fn"):
    BlockMask.from_lists(c, i, c, i, **geo)
  with pytest.raises(ValueError, match="together"):
    BlockMask.from_lists(c, i, c, None, **geo)
  with pytest.raises(ValueError, match="4 rows"):
    BlockMask.from_lists(c[..., :3], i[..., :3, :], **geo)
  with pytest.raises(ValueError, match="counts"):
    BlockMask.from_lists(c[0], i, **geo)
  with pytest.raises(TypeError, match="integer"):
    BlockMask.from_lists(c, i.astype(jnp.float32), **geo)
  with pytest.raises(ValueError, match="q_len"):
    BlockMask.from_lists(c, i, **{**geo, "q_len": 0})
  with pytest.raises(TypeError, match="integer"):
    bm.sorted_lists(jnp.zeros((2, 3)), True)
  with pytest.raises(ValueError, match="width"):
    bm.transpose_lists(c, i, 4, width=0)
