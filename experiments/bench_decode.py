r"""Times decode: dense (cuDNN) vs S2 over the compacted KV cache.

  python -m experiments.bench_decode --lengths=32768,131072 \
      --impls=cudnn,pallas_triton,xla --out=benchmarks/decode/results.json

Defaults: batch 8, 32 q / 8 kv heads, head_dim 128, bf16, the Phi-3-small S2
pattern (block 64, local 16, stride 8, offset 1). On CPU use tiny sizes:
--lengths=1024 --impls=dense_xla,xla --batch=1 --heads=4 --kv_heads=2
--inner=1.
"""

import json
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from sparsejax.inference import bench
from sparsejax.inference.pattern import S2Pattern

_LENGTHS = flags.DEFINE_list("lengths", ["32768", "131072"], "cache lengths")
_IMPLS = flags.DEFINE_list("impls", ["cudnn", "pallas_triton"],
                           "cudnn, dense_xla (dense cache); pallas_triton, "
                           "xla (S2 cache)")
_BATCH = flags.DEFINE_integer("batch", 8, "sequences")
_HEADS = flags.DEFINE_integer("heads", 32, "query heads")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "kv heads")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "head dim")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16",
                                                 "float32"], "cache dtype")
_BLOCK = flags.DEFINE_integer("block", 64, "S2 block size")
_LOCAL = flags.DEFINE_integer("local_blocks", 16, "S2 local blocks")
_STRIDE = flags.DEFINE_integer("vert_stride", 8, "S2 vertical stride")
_OFFSET = flags.DEFINE_integer("head_sliding_offset", 1, "S2 head offset")
_DENSE_HEADS = flags.DEFINE_integer("dense_heads", 0, "dense kv heads")
_SPLITS = flags.DEFINE_integer("num_splits", None, "split-K (default: auto)")
_WARPS = flags.DEFINE_integer("num_warps", 4, "Triton warps")
_STAGES = flags.DEFINE_integer("num_stages", 2, "Triton pipeline stages")
_WARMUP = flags.DEFINE_integer("warmup", 5, "warm-up calls after compile")
_REPEATS = flags.DEFINE_integer("repeats", 50, "timed calls (median)")
_INNER = flags.DEFINE_integer("inner", 10, "unsynced calls per timed repeat")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Pallas interpret mode")
_OUT = flags.DEFINE_string("out", "", "JSON output path")


def main(argv):
  del argv
  pattern = S2Pattern(block_size=_BLOCK.value, local_blocks=_LOCAL.value,
                      vert_stride=_STRIDE.value, num_heads=_HEADS.value,
                      num_kv_heads=_KV_HEADS.value,
                      num_dense_heads=_DENSE_HEADS.value,
                      head_sliding_offset=_OFFSET.value)
  rows = bench.bench_decode(
      [int(x) for x in _LENGTHS.value], _IMPLS.value, batch=_BATCH.value,
      head_dim=_HEAD_DIM.value, dtype=jnp.dtype(_DTYPE.value),
      pattern=pattern, num_splits=_SPLITS.value, num_warps=_WARPS.value,
      num_stages=_STAGES.value, warmup=_WARMUP.value,
      repeats=_REPEATS.value, inner=_INNER.value, interpret=_INTERPRET.value)
  print(bench.format_table(rows))
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    meta = {"device": str(jax.devices()[0].device_kind),
            "jax": jax.__version__,
            "flags": {f: flags.FLAGS[f].value for f in (
                "lengths", "impls", "batch", "heads", "kv_heads", "head_dim",
                "dtype", "block", "local_blocks", "vert_stride",
                "head_sliding_offset", "dense_heads", "num_splits", "num_warps",
                "num_stages", "warmup", "inner",
                "repeats")}}
    with open(_OUT.value, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
