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
  fwd = [dict(num_warps_fwd=8, num_stages_fwd=s, sub_kv_fwd=k)
         for s, k in itertools.product((2, 3, 4), (64, 128))]
  bwd = [dict(num_warps_bwd=w, num_stages_bwd=s, sub_q_dkv=sq, sub_kv_dq=sq)
         for w, s, sq in itertools.product((4, 8), (2, 3, 4), (32, 64))]
  # Forward and backward settings are independent: sweep each with the
  # other's defaults instead of the full product.
  case_kw = dict(block=_BLOCK.value)
  common = dict(heads=_HEADS.value, head_dim=_HEAD_DIM.value,
                dtype=jnp.bfloat16, case_kw=case_kw)
  fwd_rows = benchmark.tune(_CASE.value, _SEQ.value,
                            [TuningConfig(**f) for f in fwd], **common)
  bwd_rows = benchmark.tune(_CASE.value, _SEQ.value,
                            [TuningConfig(**b) for b in bwd], **common)
  ok = lambda rows: [r for r in rows if "fwdbwd_ms" in r]
  best_fwd = min(ok(fwd_rows), key=lambda r: r["fwd_ms"])
  best_bwd = min(ok(bwd_rows), key=lambda r: r["fwdbwd_ms"] - r["fwd_ms"])
  keys_f = ("num_warps_fwd", "num_stages_fwd", "sub_kv_fwd")
  keys_b = ("num_warps_bwd", "num_stages_bwd", "sub_q_dkv", "sub_kv_dq")
  best = {k: best_fwd["tuning"][k] for k in keys_f}
  best.update({k: best_bwd["tuning"][k] for k in keys_b})
  best_str = ",".join(f"{k}={v}" for k, v in best.items())
  print("best forward:", best_fwd)
  print("best backward:", best_bwd)
  print("best tuning:", best_str)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"fwd_rows": fwd_rows, "bwd_rows": bwd_rows,
                 "best_tuning": best_str}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
