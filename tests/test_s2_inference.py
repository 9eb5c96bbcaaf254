"""S2 inference: compacted KV cache + decode against full S2 attention."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax import inference
from sparsejax.inference import bench
from sparsejax.inference import S2KVCache, S2Pattern, s2_decode_attention

# GQA (2 q heads per kv head), one dense kv head, vLLM's offset 1; local 2 /
# stride 3 so blocks leave the window and ring slots recycle within the test.
PATTERN = S2Pattern(block_size=16, local_blocks=2, vert_stride=3, num_heads=8,
                    num_kv_heads=4, num_dense_heads=1, head_sliding_offset=1)
D = 32


def _reference_rows(pattern, q, k, v):
  """Full attention under sj.masks.s2 on whole sequences [B, T], every row."""
  out = sj.attention(q, k, v, pattern.mask(q.shape[1]), impl="reference")
  return np.asarray(out)


def _reference_last_row(pattern, q, k, v, n):
  """Full attention under sj.masks.s2 on tokens [0, n): the last row."""
  out = sj.attention(q[None, :n], k[None, :n], v[None, :n], pattern.mask(n),
                     impl="reference")
  return np.asarray(out[0, -1])


def _decoders():
  return {
      "xla": jax.jit(lambda q, c: s2_decode_attention(q, c, impl="xla")),
      "pallas_triton": jax.jit(lambda q, c: s2_decode_attention(
          q, c, impl="pallas_triton", interpret=True)),
  }


# Homogeneous heads, no GQA, offset 0, a ring of 3: the xla twin only (cheap).
HOMO = S2Pattern(block_size=16, local_blocks=3, vert_stride=2, num_heads=2,
                 num_kv_heads=2, homo_head=True)


@pytest.mark.parametrize("pattern,impls,steps", [
    (PATTERN, ("xla", "pallas_triton"), 36), (HOMO, ("xla",), 20)])
def test_generation_matches_full_s2_attention_every_step(pattern, impls,
                                                         steps):
  prompt = np.array([5, 37, 70])  # different lengths, mid-block
  b, max_len = len(prompt), 112
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (b, max_len, pattern.num_heads, D))
  k = jax.random.normal(ks[1], (b, max_len, pattern.num_kv_heads, D))
  v = jax.random.normal(ks[2], k.shape)
  cache = S2KVCache.create(b, max_len, pattern.num_kv_heads, D, jnp.float32,
                           pattern)
  cache = cache.prefill(k[:, :prompt.max()], v[:, :prompt.max()], prompt)
  decoders = {name: _decoders()[name] for name in impls}
  rows = np.arange(b)
  # The S2 mask is causal in absolute positions, so row n-1 of full attention
  # over [0, n) is row n-1 over all max_len tokens: one reference call
  # (building masks for every length is slow); spot-checked here.
  ref = _reference_rows(pattern, q, k, v)
  np.testing.assert_allclose(ref[2, 80], _reference_last_row(
      pattern, q[2], k[2], v[2], 81), atol=1e-6)
  for step in range(steps + 1):
    if step:  # step 0 checks the last prompt token straight after prefill
      lens = np.asarray(cache.lengths)
      cache = cache.append(k[rows, lens], v[rows, lens])
    lens = np.asarray(cache.lengths)
    np.testing.assert_array_equal(lens, prompt + step)
    want = ref[rows, lens - 1]
    for name, decode in decoders.items():
      got = np.asarray(decode(q[rows, lens - 1], cache))
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5,
                                 err_msg=f"{name}, step {step}")


def test_cache_is_compacted_and_decode_reads_only_visible_blocks():
  cache = S2KVCache.create(2, 112, PATTERN.num_kv_heads, D, jnp.float32,
                           PATTERN)
  # 7 blocks: ring 2 + ceil((7 - 2) / 3) = 2 strided slots per sparse head.
  assert (cache.ring, cache.strided) == (2, 2)
  assert cache.sparse_k.shape == (2, 3, 4 * 16, D)
  assert cache.dense_k.shape == (2, 1, 112, D)
  k = jnp.zeros((2, 100, PATTERN.num_kv_heads, D))
  cache = cache.prefill(k, k, np.array([100, 17]))
  sparse, dense = cache.decode_views()
  # Query block 6 of sequence 0: window {5, 6}; strided residues r_g =
  # (-g - 1) % 3 = 2, 1, 0 keep blocks <= 4 of their class.
  want = {0: [2, 5, 6], 1: [1, 4, 5, 6], 2: [0, 3, 5, 6]}
  for g, blocks in want.items():
    n = int(sparse.counts[0, g])
    assert sorted(np.asarray(sparse.block_idx[0, g, :n]).tolist()) == blocks
  assert int(dense.counts[0, 0]) == 7 and int(dense.counts[1, 0]) == 2
  assert np.asarray(sparse.counts[1]).tolist() == [2, 2, 2]  # blocks 0, 1


def test_append_past_capacity_raises_and_never_writes_out_of_bounds():
  cache = S2KVCache.create(2, 20, PATTERN.num_kv_heads, D, jnp.float32,
                           PATTERN)
  ones = jnp.ones((2, PATTERN.num_kv_heads, D))
  cache = cache.prefill(jnp.zeros((2, 20, 4, D)), jnp.zeros((2, 20, 4, D)),
                        np.array([19, 20]))
  with pytest.raises(ValueError, match="full.*\\[1\\].*max_len=20"):
    cache.append(ones, ones)
  with pytest.raises(ValueError, match="exceeds the cache's max_len"):
    cache.prefill(jnp.zeros((2, 21, 4, D)), jnp.zeros((2, 21, 4, D)),
                  np.array([1, 1]))
  # Under jit nothing can raise: the write is dropped and flagged.
  jitted = jax.jit(lambda c: c.append(ones, ones))(cache)
  np.testing.assert_array_equal(jitted.lengths, [20, 20])
  np.testing.assert_array_equal(jitted.overflowed, [False, True])
  assert float(jnp.abs(jitted.dense_k[1]).sum()) == 0.0
  assert float(jnp.abs(jitted.sparse_k[1]).sum()) == 0.0
  with pytest.raises(ValueError, match="dropped for sequences \\[1\\]"):
    jitted.raise_if_overflowed()


def test_phi3_small_kv_bytes_at_128k():
  pattern = inference.phi3_small()
  s2 = inference.capacity_kv_bytes(1, 131072, 128, jnp.bfloat16, pattern)
  dense = inference.dense_kv_bytes(1, 131072, 8, 128, jnp.bfloat16)
  # (16 ring + 254 strided slots) x 64 tokens of 131072 per kv head.
  assert s2 / dense == pytest.approx(270 * 64 / 131072)
  assert s2 / dense <= 0.15


@pytest.mark.parametrize("pattern,head_dim,dtype", [
    (inference.phi3_small(), 128, jnp.bfloat16),
    (PATTERN, D, jnp.float32)])
def test_decode_kernel_lowers_for_cuda(pattern, head_dim, dtype):
  cache = jax.eval_shape(lambda: S2KVCache.create(
      8, 4096 + 80, pattern.num_kv_heads, head_dim, dtype, pattern))
  q = jax.ShapeDtypeStruct((8, pattern.num_heads, head_dim), dtype)
  f = lambda q, c: s2_decode_attention(q, c, impl="pallas_triton")
  text = jax.jit(f).trace(q, cache).lower(
      lowering_platforms=("cuda",)).as_text()
  # one kernel for the sparse heads, one for the dense heads
  assert text.count("xla.gpu.triton") == 1 + (pattern.num_dense_heads > 0)


def test_bench_decode_runs_on_cpu(tmp_path):
  pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=4,
                      num_heads=4, num_kv_heads=2, num_dense_heads=1)
  rows = bench.bench_decode([256], ["dense_xla", "xla", "pallas_triton"],
                            batch=2, head_dim=16, dtype=jnp.float32,
                            pattern=pattern, warmup=0, repeats=1,
                            inner=1, interpret=True)
  assert [r["impl"] for r in rows] == ["dense_xla", "xla", "pallas_triton"]
  assert rows[2]["max_abs_err"] < 1e-4
  assert rows[1]["kv_bytes_per_token"] < rows[0]["kv_bytes_per_token"]
  out = tmp_path / "decode.json"
  subprocess.run([sys.executable, "-m", "experiments.bench_decode",
                  "--lengths=512", "--impls=dense_xla,xla", "--batch=1",
                  "--heads=4", "--kv_heads=2", "--head_dim=16",
                  "--dtype=float32", "--block=16", "--local_blocks=2",
                  "--vert_stride=4", "--warmup=0", "--repeats=1", "--inner=1",
                  f"--out={out}"], check=True, capture_output=True)
  result = json.loads(out.read_text())
  assert {r["impl"] for r in result["rows"]} == {"dense_xla", "xla"}
