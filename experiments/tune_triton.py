r"""Sweeps the Triton kernel's TuningConfig on one case and length.

  python -m experiments.tune_triton --case=s2 --seq=32768 --out=tune.json
"""

import itertools
import json

from absl import app
from absl import flags
import jax.numpy as jnp

from pallas_kernels.gpu.block_sparse_attention import TuningConfig
from sparsejax import benchmark

_CASE = flags.DEFINE_string("case", "s2", "benchmark case")
_SEQ = flags.DEFINE_integer("seq", 32768, "sequence length")
_HEADS = flags.DEFINE_integer("heads", 32, "heads")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "head dim")
_BLOCK = flags.DEFINE_integer("block", 128, "mask block size")
_OUT = flags.DEFINE_string("out", "", "JSON output")


def main(argv):
  del argv
  fwd = [dict(num_warps_fwd=w, num_stages_fwd=s, sub_kv_fwd=k)
         for w, s, k in itertools.product((4, 8), (2, 3), (64, 128))]
  bwd = [dict(num_warps_bwd=w, num_stages_bwd=s, sub_q_dkv=sq, sub_kv_dq=sk)
         for w, s, (sq, sk) in itertools.product((4, 8), (1, 2),
                                                 ((32, 32), (64, 64)))]
  # Forward and backward settings are independent: sweep each against the
  # other's default instead of the full product.
  configs = [TuningConfig(**f) for f in fwd] + [TuningConfig(**b) for b in bwd]
  rows = benchmark.tune(_CASE.value, _SEQ.value, configs, heads=_HEADS.value,
                        head_dim=_HEAD_DIM.value, dtype=jnp.bfloat16,
                        case_kw=dict(block=_BLOCK.value))
  best_fwd = min((r for r in rows if "fwd_ms" in r), key=lambda r: r["fwd_ms"])
  best_bwd = min((r for r in rows if "fwdbwd_ms" in r),
                 key=lambda r: r["fwdbwd_ms"] - r["fwd_ms"])
  print("best forward:", best_fwd)
  print("best backward:", best_bwd)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"rows": rows, "best_fwd": best_fwd, "best_bwd": best_bwd}, f,
                indent=1)


if __name__ == "__main__":
  app.run(main)
