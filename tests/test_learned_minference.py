"""MInference: the estimates and patterns against numpy transcriptions,
masks built under jit without recompiles, attention against the dense
reference, the per-head search, and the layer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparsejax as sj
from sparsejax.learned import minference
from sparsejax.nn import learned_layers
from tests import test_learned_seer
from tests.block_probs_test_base import assert_close, normal

B = 16  # block size of these tests


def _qk(l=100, h=2, hkv=1, d=16, seed=0):
  return (normal(3 * seed, (1, l, h, d)), normal(3 * seed + 1, (1, l, hkv, d)),
          normal(3 * seed + 2, (1, l, hkv, d)))


def test_vertical_slash_scores_match_loops():
  q, k, _ = _qk(l=50)
  vert, slash = minference.vertical_slash_scores(q, k, last_q=8)
  qs, ks = np.asarray(q, np.float64), np.asarray(k, np.float64)
  want_v, want_s = np.zeros((1, 2, 50)), np.zeros((1, 2, 50))
  for h in range(2):
    for i in range(8):
      pos = 42 + i
      s = qs[0, pos, h] @ ks[0, :pos + 1, 0].T / 4.0
      p = np.exp(s - s.max())
      p /= p.sum()
      want_v[0, h, :pos + 1] += p
      for j in range(pos + 1):
        want_s[0, h, pos - j] += p[j]
  np.testing.assert_allclose(vert, want_v, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(slash, want_s, rtol=1e-5, atol=1e-7)


def _np_vs_blocks(q, k, vs):
  """The block-granular vertical-slash rule, transcribed with loops."""
  l = q.shape[1]
  n = -(-l // B)
  vert, slash = (np.asarray(x, np.float64) for x in
                 minference.vertical_slash_scores(q, k, last_q=vs.last_q))
  out = np.zeros(vert.shape[:2] + (n, n), bool)
  for h in range(vert.shape[1]):
    vb = np.zeros(n)
    sb = np.zeros(n + 1)
    for j in range(l):
      vb[j // B] += vert[0, h, j]
      t = j % B
      sb[j // B] += slash[0, h, j] * (B - t) / B
      sb[j // B + 1] += slash[0, h, j] * t / B
    sb = sb[:n]
    vb[:(vs.init - 1) // B + 1] = np.inf
    sb[:-(-(vs.local - 1) // B) + 1] = np.inf
    nv = max(-(-vs.vertical // B), int(np.isinf(vb).sum()))
    ns = max(-(-vs.slash // B), int(np.isinf(sb).sum()))
    vkeep = np.argsort(-vb, kind="stable")[:nv]
    skeep = np.argsort(-sb, kind="stable")[:ns]
    for i in range(n):
      for j in range(i + 1):
        out[0, h, i, j] = (j in vkeep) or (i - j in skeep) or i == j
  return out


@pytest.mark.parametrize("pattern", [
    minference.VerticalSlash(vertical=20, slash=30, last_q=16, init=3,
                             local=20),
    minference.AShape(sink=20, local=40), minference.BlockSparse(topk=2),
    minference.Dense()], ids=lambda p: type(p).__name__)
def test_patterns_match_numpy(pattern):
  """blocks() against numpy; minference_mask's lists (from the pattern's
  picks, k not repeated for GQA) list exactly those blocks."""
  q, k, _ = _qk(h=4, hkv=2)
  got, mask = jax.jit(lambda q, k: (
      pattern.blocks(q, k, B),
      sj.learned.minference_mask(q, k, pattern, block_size=B)))(q, k)
  test_learned_seer.check_causal_lists(mask, got)
  got = np.asarray(got)
  n = -(-100 // B)
  causal = np.tril(np.ones((n, n), bool))
  assert not (got & ~causal).any()
  assert np.all(np.diagonal(got, axis1=2, axis2=3))
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  if isinstance(pattern, minference.VerticalSlash):
    want = _np_vs_blocks(q, k, pattern)
  elif isinstance(pattern, minference.AShape):
    want = np.broadcast_to(((j < 2) | (i - j < 3)) & causal, got.shape)
  elif isinstance(pattern, minference.BlockSparse):
    qp = np.asarray(sj.learned.pool_blocks(q, B, ("avg",)), np.float64)
    kp = np.asarray(sj.learned.pool_blocks(k, B, ("avg",)), np.float64)
    s = np.einsum("bihd,bjhd->bhij", qp, np.repeat(kp, 2, 2))
    s = np.where(causal, s, -np.inf)
    top = np.argsort(-s, -1, kind="stable")[..., :2]
    want = np.zeros_like(got)
    np.put_along_axis(want, top, True, -1)
    want = (want | np.eye(n, dtype=bool)) & causal
  else:
    want = np.broadcast_to(causal, got.shape)
  np.testing.assert_array_equal(got, want)


def test_mask_under_jit_matches_dense_reference_without_recompiles():
  patterns = (minference.VerticalSlash(16, 16, last_q=16, init=3, local=16),
              minference.BlockSparse(2))

  @jax.jit
  def run(q, k, v):
    mask = sj.learned.minference_mask(q, k, patterns, block_size=B)
    return (sj.attention(q, k, v, mask, impl="xla"), mask.to_dense(),
            mask, sj.learned.head_blocks(q, k, patterns, block_size=B))

  seen = []
  for seed in range(2):
    q, k, v = _qk(seed=seed)
    out, dense, mask, blocks = run(q, k, v)
    # Per-head patterns of different list widths, padded to one.
    test_learned_seer.check_causal_lists(mask, blocks)
    want = sj.learned.masked_attention_reference(q, k, v, dense)
    assert_close("out", out, want, 2e-5)
    seen.append(np.asarray(dense))
  assert run._cache_size() == 1  # pylint: disable=protected-access
  assert (seen[0] != seen[1]).any()
  with pytest.raises(ValueError, match="self-attention"):
    sj.learned.minference_mask(q, k[:, :64], patterns, block_size=B)


def test_search_picks_the_cheapest_pattern_with_enough_recall():
  """Head 0 attends locally (q_i ~ k_i), head 1 uniformly (q = 0): the
  A-shape keeps head 0's mass, only dense keeps head 1's."""
  l, d = 128, 16
  keys = normal(0, (1, l, 1, d)) * 3.0
  q = jnp.concatenate([keys, jnp.zeros_like(keys)], axis=2)
  k = jnp.concatenate([keys, keys], axis=2)
  result = sj.learned.search_patterns(
      q, k, (minference.AShape(16, 32), minference.Dense()), block_size=B,
      min_recall=0.9)
  assert result["patterns"] == ["a_shape:16:32", "dense"]
  assert result["recall"][0, 0] >= 0.9 > result["recall"][1, 0]
  np.testing.assert_allclose(result["recall"][:, 1], 1.0, rtol=1e-5)
  assert result["density"][0, 0] < result["density"][0, 1] == 1.0


def test_layer_with_dense_patterns_equals_causal_attention():
  table = json.dumps([["dense", "dense", "dense", "dense"]])
  spec = sj.nn.attention_registry.LayerSpec(
      d_model=32, num_heads=4, num_kv_heads=2, head_dim=16, seq_len=64,
      causal=True, rngs=nnx.Rngs(0), dtype=jnp.float32, impl="xla")
  layer = sj.nn.attention_registry.build_layer(
      "minference", spec, head_patterns=table, block_size=B)
  assert layer.patterns == (minference.Dense(),) * 4
  plain = sj.nn.Attention(32, 4, 2, 16, mask=sj.masks.causal(
      64, block_size=B), impl="reference", rngs=nnx.Rngs(0))
  x = normal(1, (1, 64, 32))
  apply = lambda m: jax.jit(lambda s, x: nnx.merge(nnx.graphdef(m), s)(x))(
      nnx.state(m), x)
  assert_close("layer", apply(layer), apply(plain), 2e-5)
  # Packed documents: attention stays inside each segment.
  seg = jnp.repeat(jnp.arange(4), 16)[None]
  got = jax.jit(lambda s, x, seg: nnx.merge(nnx.graphdef(layer), s)(
      x, segment_ids=seg))(nnx.state(layer), x, seg)
  _, _, v, qr, kr = learned_layers.projections(layer, x, None)
  want = learned_layers.output(layer, sj.attention(
      qr, kr, v, sj.masks.causal(64, block_size=B), q_segment_ids=seg,
      impl="reference"))
  assert_close("segments", got, want, 2e-5)
  with pytest.raises(ValueError, match="unknown MInference pattern"):
    minference.parse_pattern("stripes:3")
  assert minference.parse_pattern("vertical_slash:10:20") == (
      minference.VerticalSlash(10, 20))
