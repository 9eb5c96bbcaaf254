"""Vision ops: semantics against brute force, bias layouts, bad input, the
registries' choices and the CUDA / TPU lowering of the kernels on CPU."""

import logging

import jax
from jax.sharding import AbstractDevice, AbstractMesh
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax.vision import natten
from sparsejax.vision import permute

V = sj.vision
H200 = ("gpu", "NVIDIA H200")


def _x(shape, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


# --- permutations ------------------------------------------------------------


def test_partitions_invert_and_match_maxvit():
  x = jnp.arange(2 * 6 * 8 * 3).reshape(2, 6, 8, 3)
  w = permute.window_partition(x, (3, 4))
  # window (1, 0), position (2, 3) is token (1*3+2, 0*4+3)
  assert (w[1, 2, 2 * 4 + 3] == x[1, 5, 3]).all()
  g = permute.grid_partition(x, (2, 4))  # step (3, 2)
  # group (1, 1), position (1, 2) is token (1*3+1, 2*2+1)
  assert (g[0, 1 * 2 + 1, 1 * 4 + 2] == x[0, 4, 5]).all()
  assert (permute.window_unpartition(w, (3, 4), (6, 8)) == x).all()
  assert (permute.grid_unpartition(g, (2, 4), (6, 8)) == x).all()
  for kind, part, win in (("block", permute.window_partition, (3, 4)),
                          ("grid", permute.grid_partition, (2, 4))):
    lay = permute.WindowLayout(kind, (6, 8), win)
    parts = part(x[..., 0], win).reshape(-1, lay.tokens)
    rows = lay.rows(np.arange(parts.shape[0])[:, None],
                    np.arange(lay.tokens)[None])
    np.testing.assert_array_equal(x[..., 0].reshape(-1)[rows], parts)


def test_tile_permutation_inverts():
  x = _x((2, 9, 13, 2, 3))
  lay = permute.TileLayout((9, 13), (2, 3), (4, 4))
  y = permute.na_tile_permute(x, lay)
  assert y.shape == (2, lay.length, 2, 3) and lay.length % 16 == 0
  np.testing.assert_array_equal(permute.na_tile_unpermute(y, lay), x)


@pytest.mark.parametrize("seed", range(4))
def test_na_block_mask_equals_brute_force(seed):
  """The analytic block lists (full/partial/empty) reproduce the NATTEN rule
  element by element, for random maps, kernels, dilations, causal flags."""
  rng = np.random.default_rng(seed)
  n = 1 + seed % 2
  shape = tuple(int(s) for s in rng.integers(5, 14, n))
  dil = tuple(int(rng.integers(1, 3)) for _ in range(n))
  ker = tuple(int(rng.integers(1, s // d + 1)) for s, d in zip(shape, dil))
  causal = tuple(bool(rng.integers(2)) for _ in range(n))
  tile = (16,) if n == 1 else (4, 4)
  lay = permute.TileLayout(shape, dil, tile)
  got_perm = np.asarray(natten.block_mask(lay, ker, causal).to_dense())[0, 0]
  size = int(np.prod(shape))
  pos = np.asarray(permute.na_tile_permute(
      jnp.arange(size).reshape(1, *shape) + 1, lay))[0] - 1
  live = np.where(pos >= 0)[0]
  got = np.zeros((size, size), bool)
  got[np.ix_(pos[live], pos[live])] = got_perm[np.ix_(live, live)]
  assert not got_perm[:, pos < 0].any()  # padding is never a key
  coords = np.unravel_index(np.arange(size), shape)
  want = np.ones((size, size), bool)
  for a in range(n):  # brute force from the rule as NATTEN states it
    length, k, d = shape[a], ker[a], dil[a]
    ok = np.zeros((length, length), bool)
    for i in range(length):
      for j in range(length):
        gi, ci, gj, cj = i % d, i // d, j % d, j // d
        lg = len(range(gi, length, d))
        if causal[a]:
          inside = cj <= ci and ci - cj < k
        else:
          left, right = k // 2, k // 2 + k % 2 - 1
          c = min(max(ci, left), lg - 1 - right)
          inside = c - left <= cj <= c + right
        ok[i, j] = gi == gj and inside
    want &= ok[coords[a][:, None], coords[a][None]]
  np.testing.assert_array_equal(got, want)


def test_na_non_causal_sees_exactly_kernel_keys():
  vis, _ = natten.axis_mask_dense(11, 4, 2, False)
  assert (vis.sum(1) == 4).all()
  # even kernel K=4: 2 before, 1 after; at the border the window shifts
  assert np.nonzero(vis[10])[0].tolist() == [4, 6, 8, 10]


# --- bias layouts ------------------------------------------------------------


def _tf_reindex(table, p):
  """google-research/maxvit reindex_2d_einsum_lookup, written out."""
  heads = table.shape[0]
  out = np.zeros((heads, p, p, p, p))
  for i in range(p):
    for j in range(p):
      for x in range(p):
        for y in range(p):
          out[:, i, j, x, y] = table[:, x - i + p - 1, y - j + p - 1]
  return out.reshape(heads, p * p, p * p)


def test_bias_matrix_is_maxvit_key_minus_query():
  table = np.asarray(_x((2, 5, 5)))
  np.testing.assert_allclose(V.relative_bias.bias_matrix(jnp.asarray(table),
                                                          (3, 3)),
                             _tf_reindex(table, 3), rtol=1e-6)


def test_timm_table_converts():
  p, heads = 3, 2
  tf = np.asarray(_x((heads, 5, 5)))
  # timm: flat[(dh + p - 1) * (2p - 1) + dw + p - 1, n] with dh = q - k.
  timm = np.transpose(tf[:, ::-1, ::-1], (1, 2, 0)).reshape(-1, heads)
  np.testing.assert_allclose(V.relative_bias.from_timm(jnp.asarray(timm),
                                                       (p, p)), tf)


# --- bad input ---------------------------------------------------------------


@pytest.mark.parametrize("call,match", [
    (lambda q: V.block_attention(q, q, q, 5), "window"),
    (lambda q: V.grid_attention(q, q, q, (3, 5)), "grid"),
    (lambda q: V.block_attention(q, q, q, 3, rel_bias=jnp.zeros((2, 3, 5))),
     "rel_bias"),
    (lambda q: V.neighborhood_attention(q, q, q, 4, dilation=2), "kernel_size"),
    (lambda q: V.neighborhood_attention(q, q, q, 3, rel_bias=jnp.zeros(
        (2, 5))), "rel_bias"),
    (lambda q: V.neighborhood_attention(q, q, q, 3, tile_shape=(3, 3)),
     "tile_shape"),
    (lambda q: V.routing_attention(q, q, q, 4, 1), "num_regions"),
    (lambda q: V.routing_attention(q, q, q, 3, 10), "topk"),
    (lambda q: V.routing_attention(q, q, q, 3, 0), "topk"),
    (lambda q: V.block_attention(q[0], q[0], q[0], 3), "rank"),
    (lambda q: V.block_attention(q, q, q, 3, impl="nope"), "impl"),
])
def test_bad_input_names_the_argument(call, match):
  q = jnp.zeros((1, 6, 6, 2, 16))
  with pytest.raises(ValueError, match=match):
    call(q)


def test_bad_dtype():
  q = jnp.zeros((1, 6, 6, 2, 16), jnp.int32)
  with pytest.raises(TypeError, match="float32"):
    V.grid_attention(q, q, q, 3)


# --- registries --------------------------------------------------------------


def _na_problem(kernel, heads=2, shape=(16, 16), tile=(8, 8),
                dtype=jnp.bfloat16):
  lay = permute.TileLayout(shape, (1,) * len(shape), tile)
  table = jnp.zeros((heads,) + tuple(2 * k - 1 for k in kernel))
  return (dtype, 64, lay.tile_size,
          natten.NeighborhoodBias.create(table, lay, kernel, heads))


def test_auto_picks_and_explains(caplog):
  with sj.target_platform(*H200):
    assert V.WINDOW.resolve("auto", problem=(jnp.bfloat16, 32, 49, True)
                            ).name == "pallas_triton"
    with caplog.at_level(logging.INFO):
      # The bias is a score mod: Triton fuses it, Mosaic GPU says why not.
      assert V.NEIGHBORHOOD.resolve(
          "auto", problem=_na_problem((7, 7))).name == "pallas_triton"
      assert "pallas_mosaic_gpu: " in caplog.text
      # 17x17: 33 * 33 > 1024 gradient statistics per program -> xla.
      assert V.NEIGHBORHOOD.resolve(
          "auto", problem=_na_problem((17, 17))).name == "xla"
      assert "1089 entries" in caplog.text
    assert V.NEIGHBORHOOD.resolve(
        "auto", problem=(jnp.bfloat16, 64, 64, None)).name == (
            "pallas_mosaic_gpu")
    assert V.ROUTING.resolve("auto", problem=(jnp.bfloat16, 32, 64)
                             ).name == "pallas_triton"
  with sj.target_platform("tpu"), caplog.at_level(logging.INFO):
    assert V.NEIGHBORHOOD.resolve(
        "auto", problem=_na_problem((3,), shape=(40,), tile=(16,))
    ).name == "xla"
    assert "vector gather" in caplog.text
  q = jnp.zeros((1, 6, 6, 2, 64), jnp.bfloat16)  # a problem Mosaic takes
  with pytest.raises(ValueError, match="score mods|gather"):
    with sj.target_platform(*H200):
      V.neighborhood_attention(q, q, q, 3, rel_bias=jnp.zeros((2, 5, 5)),
                               impl="pallas_mosaic_gpu")


@pytest.mark.parametrize("shape,kernel,dil,q_tile,kv_tile", [
    ((40,), (5,), (2,), 0, 1),          # 1-D, neighbouring tiles
    ((13, 11), (4, 3), (1, 2), 0, 0),   # 2-D, even kernel, clipped offsets
    ((16, 16), (7, 7), (1, 1), 1, 2),   # 2-D, across a tile border
])
def test_na_bias_tile_stats_equal_the_autodiff_gradient(shape, kernel, dil,
                                                        q_tile, kv_tile):
  """The kernels' per-tile gradient statistics of the NA bias (sums of
  dL/dscore per table entry) equal autodiff through the mod's lookup."""
  tile = (16,) if len(shape) == 1 else (4, 4)
  lay = permute.TileLayout(shape, dil, tile)
  heads = 3
  table = _x((heads,) + tuple(2 * k - 1 for k in kernel), 1)
  mod = natten.NeighborhoodBias.create(table, lay, kernel, heads)
  bs = lay.tile_size
  g = _x((bs, bs), 2)
  b, h, q_idx, kv_idx = sj.block_sparse.block_math.coords(
      0, 2, q_tile * bs, kv_tile * bs, bs, bs)
  vis = natten.NeighborhoodMask(lay, kernel, (False,) * len(shape))(
      b, h, q_idx, kv_idx)
  g = jnp.where(vis, g, 0.0)  # the kernels' g is 0 where not visible
  assert np.asarray(vis).any()
  width = 1 << (mod.num_stats - 1).bit_length()
  stats = jax.jit(mod.tile_stats, static_argnums=6)(g, None, b, h, q_idx,
                                                    kv_idx, width)
  want = jax.grad(lambda t: (g * natten.NeighborhoodBias(t, lay, kernel)(
      0.0, b, h, q_idx, kv_idx)).sum())(mod.table)[2]
  np.testing.assert_allclose(np.asarray(stats[:mod.num_stats]),
                             np.asarray(want), rtol=1e-5, atol=1e-5)
  assert not np.asarray(stats[mod.num_stats:]).any()


# --- lowering on CPU ----------------------------------------------------------


def _lower_cuda(fn, *args, mosaic=False):
  dev = AbstractDevice(device_kind=H200[1], platform="gpu", num_cores=132)
  with sj.target_platform(*H200), jax.sharding.use_abstract_mesh(
      AbstractMesh((), (), abstract_device=dev)):
    return jax.jit(fn).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()


def _fwd_and_grad(op):
  def both(q, k, v, *rest):
    f = lambda q, k, v, *r: op(q, k, v, *r).astype(jnp.float32).sum()
    return op(q, k, v, *rest), jax.grad(f, argnums=tuple(
        range(3 + len(rest))))(q, k, v, *rest)
  return both


@pytest.mark.parametrize("shape,p,kind", [
    ((64, 56, 56, 2, 32), 7, "block"), ((16, 48, 48, 4, 32), 12, "grid"),
    ((2, 14, 28, 8, 64), 7, "grid")])
def test_window_kernel_lowers_for_cuda(shape, p, kind):
  op = V.block_attention if kind == "block" else V.grid_attention
  q = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  t = jax.ShapeDtypeStruct((shape[3], 2 * p - 1, 2 * p - 1), jnp.float32)
  text = _lower_cuda(_fwd_and_grad(
      lambda q, k, v, t: op(q, k, v, p, rel_bias=t, impl="pallas_triton")),
                     q, q, q, t)
  assert "window_attention_fwd" in text and "window_attention_bwd" in text


@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_mosaic_gpu"])
def test_na_and_routing_lower_for_cuda(impl):
  q = jax.ShapeDtypeStruct((1, 32, 32, 2, 64), jnp.bfloat16)
  na = lambda q, k, v: V.neighborhood_attention(q, k, v, 7, dilation=2,
                                                impl=impl)
  text = _lower_cuda(_fwd_and_grad(na), q, q, q)
  assert text.count("custom_call") >= 3
  if impl == "pallas_triton":  # the fused bias: gather in fwd, stats in dQ
    t = jax.ShapeDtypeStruct((2, 13, 13), jnp.float32)
    na_bias = lambda q, k, v, t: V.neighborhood_attention(
        q, k, v, 7, rel_bias=t, impl=impl)
    text = _lower_cuda(_fwd_and_grad(na_bias), q, q, q, t)
    assert text.count("custom_call") >= 3
  r = jax.ShapeDtypeStruct((2, 32, 32, 2, 64), jnp.bfloat16)
  route = lambda q, k, v: V.routing_attention(q, k, v, 4, 3, impl=impl)
  assert _lower_cuda(_fwd_and_grad(route), r, r, r).count("custom_call") >= 3


def test_window_kernel_lowers_for_tpu():
  dev = AbstractDevice(device_kind="TPU v5e", num_cores=1, platform="tpu")
  q = jax.ShapeDtypeStruct((2, 14, 14, 4, 32), jnp.bfloat16)
  t = jax.ShapeDtypeStruct((4, 13, 13), jnp.float32)
  fn = _fwd_and_grad(lambda q, k, v, t: V.block_attention(
      q, k, v, 7, rel_bias=t, impl="pallas_tpu"))
  with sj.target_platform("tpu"), jax.sharding.use_abstract_mesh(
      AbstractMesh((), (), abstract_device=dev)):
    text = jax.jit(fn).trace(q, q, q, t).lower(
        lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 2


def test_tuning_is_validated():
  from pallas_kernels.gpu import window_attention as wg  # pylint: disable=g-import-not-at-top
  from pallas_kernels.tpu import window_attention as wt  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="block_q"):
    wg.TuningConfig(block_q=24)
  with pytest.raises(ValueError, match="windows_per_program"):
    wg.TuningConfig(windows_per_program=0)
  with pytest.raises(ValueError, match="windows_per_program"):
    wt.TuningConfig(windows_per_program=-1)
