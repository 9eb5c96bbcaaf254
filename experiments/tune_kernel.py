r"""Sweeps a kernel's TuningConfig on one case and length.

  python -m experiments.tune_kernel --impl=pallas_triton --case=s2 \
      --seq=32768 --out=tune.json
  python -m experiments.tune_kernel --impl=pallas_mosaic_gpu --out=tune.json

Forward and backward settings are independent, so each is swept around the
other's defaults instead of over the full product. The Triton result's
"best_tuning" string feeds bench_attention's --triton_tuning(_json).
"""

import dataclasses
import itertools
import json

from absl import app
from absl import flags
import jax.numpy as jnp

from sparsejax import benchmark

_IMPL = flags.DEFINE_enum("impl", "pallas_triton",
                          ["pallas_triton", "pallas_mosaic_gpu"], "kernel")
_CASE = flags.DEFINE_string("case", "s2", "benchmark case")
_SEQ = flags.DEFINE_integer("seq", 32768, "sequence length")
_HEADS = flags.DEFINE_integer("heads", 32, "heads")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "head dim")
_BLOCK = flags.DEFINE_integer("block", 128, "mask block size")
_OUT = flags.DEFINE_string("out", "", "JSON output")


def _triton_sweep():
  from pallas_kernels.gpu.block_sparse_attention import TuningConfig  # pylint: disable=g-import-not-at-top
  fwd = [dict(num_warps_fwd=8, num_stages_fwd=s, sub_kv_fwd=k)
         for s, k in itertools.product((2, 3, 4), (64, 128))]
  bwd = [dict(num_warps_bwd=w, num_stages_bwd=s, sub_q_dkv=sq, sub_kv_dq=sq)
         for w, s, sq in itertools.product((4, 8), (2, 3, 4), (32, 64))]
  return TuningConfig, fwd, bwd


def _mosaic_sweep():
  from pallas_kernels.mosaic_gpu.block_sparse_attention import TuningConfig  # pylint: disable=g-import-not-at-top
  fwd = [dict(tile_kv_fwd=t, max_concurrent_steps=s)
         for t, s in itertools.product((64, 128), (2, 3))]
  fwd.append(dict(use_schedule_barrier=False))
  bwd = [dict(tile_kv_dq=a, tile_q_dkv=b)
         for a, b in itertools.product((64, 128), (64, 128))]
  bwd += [dict(max_concurrent_steps=3), dict(compute_wgs_bwd=1)]
  return TuningConfig, fwd, bwd


SWEEPS = {"pallas_triton": _triton_sweep, "pallas_mosaic_gpu": _mosaic_sweep}


def main(argv):
  del argv
  config_cls, fwd, bwd = SWEEPS[_IMPL.value]()
  common = dict(heads=_HEADS.value, head_dim=_HEAD_DIM.value,
                dtype=jnp.bfloat16, case_kw=dict(block=_BLOCK.value),
                impl=_IMPL.value)
  fwd_rows = benchmark.tune(_CASE.value, _SEQ.value,
                            [config_cls(**f) for f in fwd], **common)
  bwd_rows = benchmark.tune(_CASE.value, _SEQ.value,
                            [config_cls(**b) for b in bwd], **common)
  ok = lambda rows: [r for r in rows if "fwdbwd_ms" in r]
  best_fwd = min(ok(fwd_rows), key=lambda r: r["fwd_ms"])
  best_bwd = min(ok(bwd_rows), key=lambda r: r["fwdbwd_ms"] - r["fwd_ms"])
  # Each sweep's own knobs from its winner.
  best = {k: best_fwd["tuning"][k] for f in fwd for k in f}
  best.update({k: best_bwd["tuning"][k] for b in bwd for k in b})
  best_str = ",".join(f"{k}={v}" for k, v in best.items() if v is not None)
  print("best forward:", best_fwd)
  print("best backward:", best_bwd)
  print("best tuning:", best_str)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"impl": _IMPL.value, "fwd_rows": fwd_rows,
                 "bwd_rows": bwd_rows, "best_tuning": best_str,
                 "default": dataclasses.asdict(config_cls())}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
