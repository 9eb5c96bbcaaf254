r"""Checks a GPU kernel against the reference at GPU-sized tiles.

The shared test suite uses small blocks; this covers head_dim up to 256 with
128-wide blocks (shared-memory limits), ragged lengths, GQA, bf16:
  python -m experiments.check_gpu_shapes --impl=pallas_triton
  python -m experiments.check_gpu_shapes --impl=pallas_mosaic_gpu
"""

import itertools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import sparsejax as sj
from sparsejax.block_sparse.implementations import REGISTRY

_IMPL = flags.DEFINE_string("impl", "pallas_triton", "implementation to check")


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  fin = np.isfinite(b)
  return float(np.linalg.norm(a[fin] - b[fin]) / max(np.linalg.norm(b[fin]),
                                                      1e-30))


def main(argv):
  del argv
  length, heads, kv_heads = 2048 + 37, 8, 2
  worst = 0.0
  for d, block, kind in itertools.product((256, 128, 96, 64), (128, 64),
                                          ("causal", "s2")):
    if _IMPL.value == "pallas_triton" and d > 128 and block > 64:
      continue  # rejected with a ValueError: shared memory (see validate_blocks)
    why = REGISTRY.get(_IMPL.value).unsupported(jnp.bfloat16, d, block,
                                                        block)
    if why:
      print(f"d={d:3d} block={block:3d} {kind:6s} skipped: {why}")
      continue
    mask = (sj.masks.causal(length, block_size=block) if kind == "causal" else
            sj.masks.s2(length, heads, num_kv_heads=kv_heads, block_size=block,
                        local_blocks=2, vert_stride=4))
    ks = jax.random.split(jax.random.key(d + block), 4)
    q = jax.random.normal(ks[0], (1, length, heads, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, length, kv_heads, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], k.shape, jnp.bfloat16)
    do = jax.random.normal(ks[3], q.shape, jnp.bfloat16)
    res = {}
    try:
      for impl in ("reference", _IMPL.value):
        f = lambda q, k, v, impl=impl: sj.attention(q, k, v, mask, impl=impl,
                                                    return_lse=True)
        (o, lse), vjp = jax.vjp(jax.jit(f), q, k, v)
        res[impl] = (o, lse) + vjp((do, jnp.zeros_like(lse)))
    except Exception as e:  # pylint: disable=broad-except
      worst = float("inf")
      print(f"d={d:3d} block={block:3d} {kind:6s} FAILED: "
            f"{type(e).__name__}: {str(e)[:160]}", flush=True)
      continue
    errs = [_rel(a, b) for a, b in zip(res[_IMPL.value], res["reference"])]
    worst = max(worst, max(errs))
    print(f"d={d:3d} block={block:3d} {kind:6s} rel err out/lse/dq/dk/dv: "
          + " ".join(f"{e:.1e}" for e in errs), flush=True)
  print(f"worst relative error {worst:.2e} ({'OK' if worst < 2e-2 else 'FAIL'})")


if __name__ == "__main__":
  app.run(main)
