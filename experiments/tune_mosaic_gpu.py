r"""Sweeps the Mosaic GPU kernel's TuningConfig on one case and length.

  python -m experiments.tune_mosaic_gpu --case=s2 --seq=32768 --out=tune.json
"""

import dataclasses
import itertools
import json

from absl import app
from absl import flags
import jax.numpy as jnp

from pallas_kernels.mosaic_gpu.block_sparse_attention import TuningConfig
from sparsejax import benchmark

_CASE = flags.DEFINE_string("case", "s2", "benchmark case")
_SEQ = flags.DEFINE_integer("seq", 32768, "sequence length")
_HEADS = flags.DEFINE_integer("heads", 32, "heads")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "head dim")
_BLOCK = flags.DEFINE_integer("block", 128, "mask block size")
_OUT = flags.DEFINE_string("out", "", "JSON output")


def main(argv):
  del argv
  # Forward and backward settings are independent: sweep each around the
  # defaults instead of the full product.
  fwd = [TuningConfig(tile_kv_fwd=t, max_concurrent_steps=s)
         for t, s in itertools.product((64, 128), (2, 3))]
  fwd.append(TuningConfig(use_schedule_barrier=False))
  bwd = [TuningConfig(tile_kv_dq=a, tile_q_dkv=b)
         for a, b in itertools.product((64, 128), (64, 128))]
  bwd += [TuningConfig(max_concurrent_steps=3),
          TuningConfig(compute_wgs_bwd=1)]
  common = dict(heads=_HEADS.value, head_dim=_HEAD_DIM.value,
                dtype=jnp.bfloat16, case_kw=dict(block=_BLOCK.value),
                impl="pallas_mosaic_gpu")
  fwd_rows = benchmark.tune(_CASE.value, _SEQ.value, fwd, **common)
  bwd_rows = benchmark.tune(_CASE.value, _SEQ.value, bwd, **common)
  ok = lambda rows: [r for r in rows if "fwdbwd_ms" in r]
  print("best forward:", min(ok(fwd_rows), key=lambda r: r["fwd_ms"]))
  print("best backward:", min(ok(bwd_rows),
                              key=lambda r: r["fwdbwd_ms"] - r["fwd_ms"]))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"fwd_rows": fwd_rows, "bwd_rows": bwd_rows,
                 "default": dataclasses.asdict(TuningConfig())}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
