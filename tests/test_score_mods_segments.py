"""Score mods and segment ids beyond the shared suite: the kernel gradient
protocol, list refinement, no recompilation across packings, and how each
implementation reports what it cannot run."""

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax.block_sparse import segments
from sparsejax.block_sparse.block_mask import EMPTY, FULL
from sparsejax.block_sparse.implementations import REGISTRY
from tests.attention_cases import packed_ids
from tests.attention_test_base import assert_close

H200 = ("gpu", "NVIDIA H200")
# Jitted: one compile instead of dispatching each jnp op of the refinement.
_refine = jax.jit(segments.refine, static_argnames=("batch", "heads"))


def _qkv(b=1, lq=64, lk=64, h=2, hkv=2, d=16, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, lq, h, d)),
          jax.random.normal(ks[1], (b, lk, hkv, d)),
          jax.random.normal(ks[2], (b, lk, hkv, d)))


@pytest.mark.parametrize("vectors", [False, True], ids=["tiles", "vectors"])
@pytest.mark.parametrize("window,q0,kv0", [
    (5, 32, 0),     # tile entirely left of the band: one end bucket
    (5, 0, 32),     # entirely right of it: the other end
    (5, 8, 4),      # a band tile: offsets inside and both ends
    (40, 16, 0),    # window wider than the tile: every offset inside
])
def test_relative_bias_tile_stats_equal_the_autodiff_gradient(window, q0,
                                                              kv0, vectors):
  """Index tiles (xla, TPU) and index vectors [16, 1] / [1, 16] (Triton)."""
  table = jax.random.normal(jax.random.key(0), (3, 2 * window - 1))
  mod = sj.score_mods.RelativeBias(table)
  g = jax.random.normal(jax.random.key(1), (16, 16))
  b, h, q_idx, kv_idx = sj.block_sparse.block_math.coords(0, 2, q0, kv0, 16,
                                                          16)
  if vectors:
    q_idx, kv_idx = sj.score_mods.tile_coords(q0, kv0, 16, 16)
  width = 1 << (2 * window - 2).bit_length()
  stats = jax.jit(mod.tile_stats, static_argnums=6)(g, None, b, h, q_idx,
                                                    kv_idx, width)
  assert stats.shape == (width,)
  want = jax.grad(lambda t: (g * dataclasses.replace(mod, table=t)(
      0.0, b, h, q_idx, kv_idx)).sum())(table)[2]
  np.testing.assert_allclose(np.asarray(stats[:2 * window - 1]),
                             np.asarray(want), rtol=1e-5, atol=1e-5)
  assert not np.asarray(stats[2 * window - 1:]).any()


# One compile per mod class and row_offset form across the cases below.
_tile_bias = jax.jit(lambda mod, f, b, h, q0, kv0, row: mod.tile_bias(
    f, b, h, q0, kv0, 8, 16, row))
_tile_weights = jax.jit(lambda mod, b, h, q0, kv0: mod.tile_weights(
    None, b, h, q0, kv0, 8, 16))


@pytest.mark.parametrize("q0,kv0", [
    (48, 0),    # q >= kv on the whole tile (rank-one form)
    (0, 48),    # q <= kv throughout (rank-one form, other sign)
    (16, 16),   # the diagonal: |.| per element
    (23, 8),    # crossing off the block grid
    (24, 9),    # q - kv >= 0 just barely (off = bk - 1)
])
@pytest.mark.parametrize("row_offset", [False, True])
def test_tile_forms_equal_the_mod(q0, kv0, row_offset):
  """tile_bias = factor * (mod(s) - s) (+ row_offset) and tile_weights =
  stat weights, for Alibi (its rank-one / |.| split, any slope sign) and
  RelativeBias (the default route through index vectors)."""
  bq, bk, factor = 8, 16, 1.4426950408889634
  q_idx = q0 + np.arange(bq)[:, None]
  kv_idx = kv0 + np.arange(bk)[None, :]
  row = (jax.random.normal(jax.random.key(2), (bq, 1)) if row_offset else
         None)
  add = np.asarray(row) if row_offset else 0.0
  slopes = jnp.asarray([0.25, -0.5, 0.0])
  table = jax.random.normal(jax.random.key(3), (3, 2 * 5 - 1))
  dist = np.abs(q_idx - kv_idx).astype(np.float32)
  offsets = np.clip(kv_idx - q_idx, -4, 4) + 4
  for h in range(3):
    for mod, bias in ((sj.score_mods.Alibi(slopes), -slopes[h] * dist),
                      (sj.score_mods.RelativeBias(table),
                       np.asarray(table)[h][offsets])):
      got = _tile_bias(mod, factor, 0, h, q0, kv0, row)
      np.testing.assert_allclose(
          np.broadcast_to(np.asarray(got), (bq, bk)),
          factor * np.asarray(bias) + add, rtol=1e-6, atol=1e-5,
          err_msg=type(mod).__name__)
  w = _tile_weights(sj.score_mods.Alibi(slopes), 0, 1, q0, kv0)
  np.testing.assert_array_equal(np.asarray(w[0]), -dist)


def test_tree_sum_is_a_fixed_order_sum():
  x = jax.random.normal(jax.random.key(0), (5, 7))
  np.testing.assert_allclose(sj.score_mods.tree_sum(x, 0), x.sum(0),
                             rtol=1e-6)


def test_refined_lists_skip_blocks_whose_ids_never_match():
  mask = sj.masks.causal(64, block_size=16)
  ids = jnp.asarray(packed_ids([(16, 24, 24)], 64))
  lists = _refine(mask, ids, ids, batch=1, heads=1)
  count = lambda n: int(lists[f"{n}_counts"].sum())
  # Causal: 4 partial (diagonal) + 6 full blocks. Docs [0,16) [16,40)
  # [40,64): q blocks hold ids {0}, {1}, {1,2}, {2}.
  assert count("partial") == 4  # the diagonals overlap themselves
  assert count("seg") == 2      # (2, 1) and (3, 2): one id vs two
  assert count("full") == 0     # no full block keeps a single shared id
  # (1, 0), (2, 0), (3, 0), (3, 1): disjoint ids, skipped (never listed).
  assert lists["q_segments"].shape == lists["kv_segments"].shape == (1, 64)


def test_refinement_matches_the_dense_definition_of_blocks():
  mask = sj.masks.sliding_window(80, 30, block_size=16)
  q_ids = packed_ids([(20, 35, 25)], 80)
  lists = _refine(mask, jnp.asarray(q_ids), jnp.asarray(q_ids),
                          batch=1, heads=1)
  dense = np.asarray(mask.to_dense())[0, 0] & (q_ids[0][:, None] ==
                                               q_ids[0][None, :])
  pad = np.zeros((80, 80), bool)
  pad[:80, :80] = dense
  blocks = pad.reshape(5, 16, 5, 16).any((1, 3))
  listed = np.zeros((5, 5), bool)
  for n in ("full", "partial", "seg"):
    c, i = np.asarray(lists[f"{n}_counts"])[0, 0], np.asarray(
        lists[f"{n}_idx"])[0, 0]
    for r in range(5):
      listed[r, i[r, :c[r]]] = True
  np.testing.assert_array_equal(listed, blocks)  # sorted ids: exact


def test_new_packing_neither_retraces_nor_recompiles():
  q, k, v = _qkv()
  mask = sj.masks.causal(64, block_size=16)
  traces = []

  def f(q, k, v, ids):
    traces.append(1)
    return sj.attention(q, k, v, mask, q_segment_ids=ids, impl="xla")

  f = jax.jit(f)
  ref = jax.jit(lambda ids: sj.attention(q, k, v, mask, q_segment_ids=ids,
                                         impl="reference"))
  for docs in ((10, 30, 24), (40, 24), (64,)):
    ids = jnp.asarray(packed_ids([docs], 64))
    want = ref(ids)
    assert_close("out", f(q, k, v, ids), want, 2e-5)
  assert len(traces) == 1
  assert f._cache_size() == 1  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class PlainHeadBias:
  """A user mod that is a plain frozen dataclass (no ScoreMod base). Its
  bias scales with the distance: a constant per-head bias would cancel in
  the softmax and have a zero gradient."""
  bias: Any

  def __call__(self, score, b, h, q_idx, kv_idx):
    return score + self.bias[h] * (q_idx - kv_idx) / 16


def test_plain_dataclass_mod_differentiates_on_xla():
  q, k, v = _qkv(lq=40, lk=40)
  bias = jnp.asarray([0.3, -0.2])

  def loss(bias, impl):
    out = sj.attention(q, k, v, sj.masks.causal(40, block_size=16),
                       score_mod=PlainHeadBias(bias), impl=impl)
    return (out * jnp.cos(out)).sum()

  g_ref = jax.jit(jax.grad(loss), static_argnums=1)(bias, "reference")
  g_xla = jax.jit(jax.grad(loss), static_argnums=1)(bias, "xla")
  assert_close("dbias", g_xla, g_ref, 2e-5)
  assert np.abs(np.asarray(g_ref)).min() > 1e-3  # a real gradient


def test_mod_without_tile_stats_falls_back_or_raises(caplog):
  q, k, v = _qkv()
  mod = PlainHeadBias(jnp.zeros(2))
  with pytest.raises(ValueError, match="no tile_stats"):
    sj.attention(q, k, v, score_mod=mod, impl="pallas_triton",
                 interpret=True)
  sj.score_mods.check(mod)
  with sj.target_platform(*H200), caplog.at_level(logging.INFO):
    impl = REGISTRY.resolve("auto", False, (jnp.bfloat16, 128, 128, 128, mod,
                                            False))
  assert impl.name == "xla"
  assert "no tile_stats" in caplog.text


@pytest.mark.parametrize("mod,seg,why", [
    (sj.score_mods.Alibi(jnp.zeros(2)), False, "score mods are not in the "
     "Mosaic GPU kernel"),
    (None, True, "segment ids are not in the Mosaic GPU kernel"),
])
def test_mosaic_gpu_reports_mods_and_segments_unsupported(mod, seg, why,
                                                          caplog):
  problem = (jnp.bfloat16, 128, 128, 128, mod, seg)
  with sj.target_platform(*H200):
    with caplog.at_level(logging.INFO):
      assert REGISTRY.resolve("auto", False, problem).name == "pallas_triton"
    assert why in caplog.text
    with pytest.raises(ValueError, match=why):
      REGISTRY.resolve("pallas_mosaic_gpu", False, problem)
    # Without them Hopper still gets the Mosaic kernel.
    assert REGISTRY.resolve("auto", False, problem[:4] + (None, False)).name \
        == "pallas_mosaic_gpu"
  q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  ids = jnp.zeros((1, 256), jnp.int32) if seg else None
  with sj.target_platform(*H200), pytest.raises(ValueError, match=why):
    jax.eval_shape(lambda q: sj.attention(
        q, q, q, impl="pallas_mosaic_gpu", score_mod=mod,
        q_segment_ids=ids), q)


def test_segment_states_constants():
  # Blocks are only ever removed or demoted by ids, never added.
  mask = sj.masks.full(32, block_size=16)
  ids = jnp.asarray(packed_ids([(16, 16)], 32))
  lists = _refine(mask, ids, ids, batch=1, heads=1)
  assert int(lists["full_counts"].sum()) == 2
  assert int(lists["seg_counts"].sum()) == 0
  states = np.asarray(mask.block_states())[0, 0]
  assert (states == FULL).all() and not (states == EMPTY).any()
