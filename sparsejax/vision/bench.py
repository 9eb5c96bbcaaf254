"""Benchmarks of the vision ops (used by experiments/bench_vision.py).

Timing is `sparsejax.benchmark.median_ms` (compile, warm-up, median of
synchronised repeats) on random normal inputs, the same shapes for every
contender. Forward+backward differentiates q, k, v and the bias table.
Memory: XLA's compiled memory analysis of the jitted call (arguments +
outputs + temporaries), which does not depend on what ran before, and the
device allocator's peak (`device_peak_mib`, one fresh process per case:
experiments/bench_vision.py --parts=routing_memory).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import sparsejax as sj
from sparsejax import benchmark

V = sj.vision

# (images, side, heads, head_dim, P): MaxViT-T stages at 224, and 384.
MAXVIT = [(64, 56, 2, 32, 7), (64, 28, 4, 32, 7), (64, 14, 8, 32, 7),
          (16, 48, 4, 32, 12)]
# (batch, map, heads, head_dim, kernel)
NA = [(1, (32768,), 16, 128, 2048), (1, (256, 256), 24, 128, 80),
      (1, (128, 128), 16, 64, 13)]
# (images, side, channels, heads, regions, topk): BiFormer-T stages 1-3.
ROUTING = [(64, 56, 64, 2, 7, 1), (64, 28, 128, 4, 7, 4),
           (64, 14, 256, 8, 7, 16)]
# NA with and without the fused relative bias (NAT-Mini stage 1; the
# 128x128 K13 case above). The 1-D K2048 and 2-D K80 tables exceed the
# kernels' gradient-statistics budget (natten.MAX_KERNEL_BIAS_ENTRIES).
NA_BIAS = [(64, (56, 56), 2, 32, 7), (1, (128, 128), 16, 64, 13)]
SMOKE = dict(maxvit=[(2, 14, 2, 32, 7)], na=[(1, (256,), 2, 32, 15),
                                             (1, (16, 16), 2, 32, 5)],
             na_bias=[(1, (16, 16), 2, 32, 5)],
             routing=[(2, 14, 32, 2, 7, 2)])


def _na_shape(b, shape, heads, d, kern) -> str:
  """The shape label of .peer/peer_variants.py's NA rows (rows merge)."""
  if len(shape) == 1:
    return f"B{b} L{shape[0]} H{heads} D{d} K{kern}"
  return (f"B{b} {'x'.join(map(str, shape))} H{heads} D{d} "
          f"K{'x'.join([str(kern)] * len(shape))}")


def _inputs(shape, dtype, n=4, seed=0):
  ks = jax.random.split(jax.random.key(seed), n)
  return [jax.random.normal(k, shape, dtype) for k in ks]


def _time(fn, args, warmup, repeats, bwd):
  if bwd:
    def loss(*a):
      return fn(*a).astype(jnp.float32).sum()
    g = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
    return benchmark.median_ms(g, args, warmup, repeats)
  return benchmark.median_ms(jax.jit(fn), args, warmup, repeats)


def _memory_mib(fn, args, bwd):
  f = fn
  if bwd:
    f = jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(),
                 argnums=tuple(range(len(args))))
  try:
    m = jax.jit(f).lower(*args).compile().memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes
             + m.temp_size_in_bytes)
    return total / 2 ** 20
  except Exception:  # pylint: disable=broad-except
    return None


def _run(rows, case, shape, name, fn, args, flops, warmup, repeats, log,
         memory=False, ref=None):
  for bwd in (False, True):
    row = dict(case=case, shape=shape, contender=name, bwd=bwd)
    try:
      ms = _time(fn, args, warmup, repeats, bwd)
      row.update(ms=ms, useful_tflops=flops * (3.5 if bwd else 1) / ms / 1e9)
      if memory:
        row["memory_mib"] = _memory_mib(fn, args, bwd)
      if ref is not None and not bwd:
        row["err_vs_xla"] = benchmark.max_rel_error(jax.jit(fn)(*args), ref)
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    rows.append(row)
    log(format_row(row))


def maxvit_rows(cases, impls, warmup, repeats, log=print, dtype=jnp.bfloat16):
  rows = []
  for imgs, side, heads, d, p in cases:
    shape = f"{imgs}img {side}x{side} H{heads} D{d} P{p}"
    q, k, v = _inputs((imgs, side, side, heads, d), dtype, 3)
    table = 0.02 * jax.random.normal(jax.random.key(9),
                                     (heads, 2 * p - 1, 2 * p - 1))
    qw, kw, vw = (V.window_partition(x, p) for x in (q, k, v))
    flops = 4 * imgs * side * side * heads * d * p * p
    ref = jax.jit(lambda q, k, v, t: V.window_attention(
        q, k, v, p, rel_bias=t, impl="xla"))(qw, kw, vw, table)
    _run(rows, "maxvit", shape, "xla einsum (pre-partitioned)",
         lambda q, k, v, t: V.window_attention(q, k, v, p, rel_bias=t,
                                               impl="xla"),
         (qw, kw, vw, table), flops, warmup, repeats, log)
    for impl in impls:
      _run(rows, "maxvit", shape, f"{impl} window (pre-partitioned)",
           lambda q, k, v, t, i=impl: V.window_attention(
               q, k, v, p, rel_bias=t, impl=i),
           (qw, kw, vw, table), flops, warmup, repeats, log, ref=ref)
      refb = V.window_unpartition(ref, p, (side, side))
      _run(rows, "maxvit", shape, f"{impl} block (permutation fused)",
           lambda q, k, v, t, i=impl: V.block_attention(
               q, k, v, p, rel_bias=t, impl=i),
           (q, k, v, table), flops, warmup, repeats, log, ref=refb)
      _run(rows, "maxvit", shape, f"{impl} grid (permutation fused)",
           lambda q, k, v, t, i=impl: V.grid_attention(
               q, k, v, p, rel_bias=t, impl=i),
           (q, k, v, table), flops, warmup, repeats, log)
    _run(rows, "maxvit", shape, "xla block (with permutation)",
         lambda q, k, v, t: V.block_attention(q, k, v, p, rel_bias=t,
                                              impl="xla"),
         (q, k, v, table), flops, warmup, repeats, log)
  return rows


def na_rows(cases, impls, warmup, repeats, log=print, dtype=jnp.bfloat16,
            cudnn=True):
  rows = []
  for b, shape_, heads, d, kern in cases:
    n = len(shape_)
    shape = _na_shape(b, shape_, heads, d, kern)
    q, k, v = _inputs((b, *shape_, heads, d), dtype, 3)
    size = 1
    for s in shape_:
      size *= s
    flops = 4 * b * heads * size * kern ** n * d
    for impl in impls:
      _run(rows, f"na{n}d", shape, f"{impl} (with permutation)",
           lambda q, k, v, i=impl: V.neighborhood_attention(q, k, v, kern,
                                                            impl=i),
           (q, k, v), flops, warmup, repeats, log)
      spec_tile = V.default_tile(n, d)
      lay = V.permute.TileLayout(tuple(shape_), (1,) * n, spec_tile)
      mask = V.implementations.na_block_mask(lay, (kern,) * n, (False,) * n)
      qp, kp, vp = (V.na_tile_permute(x, lay) for x in (q, k, v))
      _run(rows, f"na{n}d", shape, f"{impl} (kernel only, tokens permuted)",
           lambda q, k, v, i=impl: sj.attention(q, k, v, mask, impl=i),
           (qp, kp, vp), flops, warmup, repeats, log)
    if cudnn:
      flat = [x.reshape(b, size, heads, d) for x in (q, k, v)]
      _run(rows, f"na{n}d", shape, "cudnn dense",
           lambda q, k, v: jax.nn.dot_product_attention(
               q, k, v, implementation="cudnn"),
           tuple(flat), 4 * b * heads * size * size * d, warmup, repeats, log)
  return rows


def na_bias_rows(cases, impls, warmup, repeats, log=print,
                 dtype=jnp.bfloat16):
  """What the fused relative bias costs: NA with and without it."""
  rows = []
  for b, shape_, heads, d, kern in cases:
    n = len(shape_)
    shape = _na_shape(b, shape_, heads, d, kern)
    q, k, v = _inputs((b, *shape_, heads, d), dtype, 3)
    table = 0.1 * jax.random.normal(jax.random.key(9),
                                    (heads,) + (2 * kern - 1,) * n)
    size = 1
    for s in shape_:
      size *= s
    flops = 4 * b * heads * size * kern ** n * d
    with_bias = lambda i: (lambda q, k, v, t: V.neighborhood_attention(
        q, k, v, kern, rel_bias=t, impl=i))
    ref = jax.jit(with_bias("xla"))(q, k, v, table)
    for impl in impls:
      _run(rows, "na_bias", shape, f"{impl} no bias",
           lambda q, k, v, i=impl: V.neighborhood_attention(q, k, v, kern,
                                                            impl=i),
           (q, k, v), flops, warmup, repeats, log)
      _run(rows, "na_bias", shape, f"{impl} + rel bias (fused, with grad)",
           with_bias(impl), (q, k, v, table), flops, warmup, repeats, log,
           ref=ref)
  return rows


def _routing_case(case, dtype):
  imgs, side, c, heads, regions, topk = case
  d = c // heads
  shape = f"{imgs}img {side}x{side} C{c} h{heads} win{regions} top{topk}"
  r = (side // regions) ** 2
  flops = 4 * imgs * regions ** 2 * r * topk * r * c
  fn = lambda i: (lambda q, k, v: V.routing_attention(
      q, k, v, regions, topk, scale=c ** -0.5, impl=i))
  return shape, (imgs, side, side, heads, d), flops, fn


def routing_rows(cases, impls, warmup, repeats, log=print,
                 dtype=jnp.bfloat16):
  rows = []
  for case in cases:
    shape, qshape, flops, fn = _routing_case(case, dtype)
    q, k, v = _inputs(qshape, dtype, 3)
    for impl in impls:
      _run(rows, "biformer", shape, f"{impl} routing (with permutation)",
           fn(impl), (q, k, v), flops, warmup, repeats, log, memory=True)
  return rows


def device_peak_mib(case, impl, dtype=jnp.bfloat16) -> dict:
  """Routing fwd+bwd's device peak (allocator's peak_bytes_in_use) in a
  process that has run nothing else: call it in a fresh process."""
  shape, qshape, _, fn = _routing_case(case, dtype)
  row = dict(case="biformer", shape=shape, bwd=True,
             contender=f"{impl} routing (with permutation)")
  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return dict(row, error=f"no memory_stats on {jax.devices()[0].platform}")
  q, k, v = _inputs(qshape, dtype, 3)
  inputs = 3 * q.size * q.dtype.itemsize
  g = jax.jit(jax.grad(lambda *a: fn(impl)(*a).astype(jnp.float32).sum(),
                       argnums=(0, 1, 2)))
  jax.block_until_ready(g(q, k, v))
  stats = jax.devices()[0].memory_stats()
  return dict(row, device_peak_mib=stats["peak_bytes_in_use"] / 2 ** 20,
              inputs_mib=inputs / 2 ** 20)


def format_row(r) -> str:
  head = (f"{r['case']:9s} {r['contender']:42s} {r['shape']:36s} "
          f"{'fwd+bwd' if r['bwd'] else 'fwd    '}")
  if "error" in r:
    return f"{head} FAILED {r['error']}"
  extra = ""
  if r.get("memory_mib") is not None:
    extra += f" {r['memory_mib']:8.0f} MiB"
  if r.get("err_vs_xla") is not None:
    extra += f" err {r['err_vs_xla']:.1e}"
  return (f"{head} {r['ms']:9.3f} ms {r['useful_tflops']:7.1f} TF/s"
          + extra)
