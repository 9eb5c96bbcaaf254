"""Decode benchmark: dense decode (cuDNN) vs S2 decode over the compacted cache.

One query token per sequence against a cache holding `length` tokens. Dense
contenders read a dense [B, L, Hkv, D] cache; S2 contenders read an
S2KVCache filled with random K/V (contents do not change the work). Timing:
compile, warm-up calls, then the median of `repeats` calls each synchronised
with block_until_ready (sparsejax.benchmark.median_ms). That sync costs
~70-90 µs of host time per call on the H200 machine (an empty jit measures
that much), so `us_per_step` issues `inner` steps back to back and syncs once
(as a decode loop runs); `us_per_call_synced` keeps the per-call number.
Reports KV bytes held per token, KV bytes read per step and the implied
bandwidth.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import benchmark
from sparsejax.inference import s2_decode
from sparsejax.inference.pattern import S2Pattern
from sparsejax.inference.s2_cache import S2KVCache, dense_kv_bytes

DENSE_IMPLS = {"cudnn": "cudnn", "dense_xla": "xla"}


def _dense_case(impl, batch, length, pattern, head_dim, dtype, key):
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (batch, 1, pattern.num_heads, head_dim), dtype)
  shape = (batch, length, pattern.num_kv_heads, head_dim)
  k = jax.random.normal(kk, shape, dtype)
  v = jax.random.normal(kv, shape, dtype)
  # One query at the end of the sequence sees every key: no mask needed.
  fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, implementation=DENSE_IMPLS[impl]))
  held = dense_kv_bytes(batch, length, pattern.num_kv_heads, head_dim, dtype)
  return fn, (q, k, v), held, held


def _s2_cache(batch, length, pattern, head_dim, dtype, key):
  """A full cache (lengths == length) with random contents."""
  cache = S2KVCache.create(batch, length, pattern.num_kv_heads, head_dim,
                           dtype, pattern)
  ks = jax.random.split(key, 4)
  rand = lambda k, x: jax.random.normal(k, x.shape, dtype)
  return dataclasses.replace(
      cache, sparse_k=rand(ks[0], cache.sparse_k),
      sparse_v=rand(ks[1], cache.sparse_v), dense_k=rand(ks[2], cache.dense_k),
      dense_v=rand(ks[3], cache.dense_v),
      lengths=jnp.full((batch,), length, jnp.int32))


def pipelined_us(fn, args, warmup: int, repeats: int, inner: int) -> float:
  """Median over repeats of (time for `inner` unsynced calls) / inner."""
  return benchmark.median_ms(fn, args, warmup, repeats, inner) * 1e3


def _read_bytes(cache: S2KVCache) -> int:
  """K and V bytes the visit lists touch in one decode step."""
  bs = cache.pattern.block_size
  d, item = cache.sparse_k.shape[-1], jnp.dtype(cache.sparse_k.dtype).itemsize
  return sum(int(np.asarray(view.counts).sum()) * bs * d * item * 2
             for view in cache.decode_views())


def bench_decode(lengths: Sequence[int] = (32768, 131072),
                 impls: Sequence[str] = ("cudnn", "pallas_triton"), *,
                 batch: int = 8, head_dim: int = 128, dtype=jnp.bfloat16,
                 pattern: Optional[S2Pattern] = None,
                 num_splits: Optional[int] = None, num_warps: int = 4,
                 num_stages: int = 2, warmup: int = 5,
                 repeats: int = 50, inner: int = 10, check: bool = True,
                 interpret: bool = False) -> List[Dict]:
  """Rows {impl, length, us_per_step, kv_bytes_per_token, ...}.

  impls: "cudnn" / "dense_xla" (jax.nn.dot_product_attention on a dense
  cache) and "pallas_triton" / "xla" (s2_decode_attention). With `check`,
  each S2 impl's output is compared with the xla twin (max_abs_err).
  """
  pattern = pattern or S2Pattern(block_size=64, local_blocks=16,
                                 vert_stride=8, num_heads=32, num_kv_heads=8,
                                 head_sliding_offset=1)
  rows = []
  for length in lengths:
    key = jax.random.key(length)
    cache = None
    for impl in impls:
      row = {"impl": impl, "length": int(length), "batch": batch,
             "heads": pattern.num_heads, "kv_heads": pattern.num_kv_heads,
             "head_dim": head_dim, "dtype": jnp.dtype(dtype).name}
      if impl in DENSE_IMPLS:
        fn, args, held, read = _dense_case(impl, batch, length, pattern,
                                           head_dim, dtype, key)
      elif impl in s2_decode.IMPLS:
        if cache is None:
          cache = _s2_cache(batch, length, pattern, head_dim, dtype, key)
        q = jax.random.normal(key, (batch, pattern.num_heads, head_dim),
                              dtype)
        fn = jax.jit(lambda q, c, impl=impl: s2_decode.s2_decode_attention(
            q, c, impl=impl, interpret=interpret, num_splits=num_splits,
            num_warps=num_warps, num_stages=num_stages))
        args, held, read = (q, cache), cache.kv_bytes(), _read_bytes(cache)
        if check and impl != "xla":
          want = s2_decode.s2_decode_attention(q, cache, impl="xla")
          row["max_abs_err"] = float(jnp.abs(
              fn(*args).astype(jnp.float32) - want.astype(jnp.float32)).max())
      else:
        raise ValueError(f"unknown impl {impl!r}; expected one of "
                         f"{sorted(DENSE_IMPLS) + list(s2_decode.IMPLS)}")
      us = pipelined_us(fn, args, warmup, repeats, inner)
      synced = benchmark.median_ms(fn, args, warmup, repeats) * 1e3
      row.update(us_per_step=us, us_per_call_synced=synced, kv_bytes=held,
                 kv_bytes_per_token=held / (batch * length),
                 read_bytes_per_step=read, read_tb_per_s=read / us * 1e-6)
      rows.append(row)
      del fn, args
  _add_speedups(rows)
  return rows


def _add_speedups(rows: List[Dict]) -> None:
  """speedup_vs_best_dense: the fastest dense contender at the same length."""
  for length in {r["length"] for r in rows}:
    dense = [r["us_per_step"] for r in rows
             if r["length"] == length and r["impl"] in DENSE_IMPLS]
    for r in rows:
      if dense and r["length"] == length:
        r["speedup_vs_best_dense"] = min(dense) / r["us_per_step"]


def format_table(rows: List[Dict]) -> str:
  lines = [f"{'impl':>14} {'length':>8} {'us/step':>10} {'synced':>8} "
           f"{'KV B/token':>11} {'read TB/s':>9} {'vs dense':>8}"]
  for r in rows:
    sp = r.get("speedup_vs_best_dense")
    lines.append(f"{r['impl']:>14} {r['length']:>8} {r['us_per_step']:>10.1f} "
                 f"{r['us_per_call_synced']:>8.1f} "
                 f"{r['kv_bytes_per_token']:>11.0f} {r['read_tb_per_s']:>9.2f} "
                 f"{'' if sp is None else f'{sp:.2f}x':>8}")
  return "\n".join(lines)
