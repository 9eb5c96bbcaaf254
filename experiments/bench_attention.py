r"""Times block-sparse attention against cuDNN: forward and forward+backward.

  python -m experiments.bench_attention --lengths=4096,32768,131072 \
      --out_dir=benchmarks/attention

Prints a table (ms, useful TFLOP/s, speed-up over dense causal cuDNN), writes
results.json and a plot. On CPU use small lengths and --impls=xla.
"""

import json
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from sparsejax import benchmark
from sparsejax import plotting

_LENGTHS = flags.DEFINE_list("lengths", ["4096", "8192", "16384", "32768",
                                         "65536", "131072"], "sequence lengths")
_CASES = flags.DEFINE_list("cases", ["dense_causal", "sliding_window", "s2"],
                           f"cases: {sorted(benchmark.CASES)}")
_IMPLS = flags.DEFINE_list("impls", ["pallas_triton", "cudnn"],
                           "sparsejax impl names, or 'cudnn'")
_BATCH = flags.DEFINE_integer("batch", 1, "batch size")
_HEADS = flags.DEFINE_integer("heads", 32, "query heads")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 32, "kv heads")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "head dim")
_BLOCK = flags.DEFINE_integer("block", 128, "mask block size")
_WINDOW = flags.DEFINE_integer("window", 2048, "sliding window")
_LOCAL = flags.DEFINE_integer("local_blocks", 8, "S2 local blocks")
_STRIDE = flags.DEFINE_integer("vert_stride", 8, "S2 vertical stride")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16",
                                                 "float32"], "input dtype")
_WARMUP = flags.DEFINE_integer("warmup", 3, "warm-up calls after compile")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed calls (median)")
_SKIP_BWD_ABOVE = flags.DEFINE_integer("max_bwd_len", 1 << 20,
                                       "skip fwd+bwd above this length")
_TUNING = flags.DEFINE_string(
    "triton_tuning", "", "TuningConfig fields for pallas_triton, e.g. "
    "'num_warps_fwd=8,num_stages_fwd=3,sub_q_dkv=32'")
_TUNING_JSON = flags.DEFINE_string(
    "triton_tuning_json", "", "read --triton_tuning from tune_kernel's JSON")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "where to write JSON + plot")
_PEERS = flags.DEFINE_string("peers", "", "peer_baselines.py JSON to plot")


def main(argv):
  del argv
  if _TUNING_JSON.value:
    with open(_TUNING_JSON.value) as f:
      flags.FLAGS.triton_tuning = json.load(f)["best_tuning"]
    print("tuning:", flags.FLAGS.triton_tuning)
  rows = benchmark.run_grid(
      lengths=[int(x) for x in _LENGTHS.value], cases=_CASES.value,
      contenders=benchmark.contenders(
          _IMPLS.value, benchmark.parse_tuning(_TUNING.value)), batch=_BATCH.value,
      heads=_HEADS.value, kv_heads=_KV_HEADS.value, head_dim=_HEAD_DIM.value,
      dtype=jnp.dtype(_DTYPE.value),
      case_kw=dict(block=_BLOCK.value, window=_WINDOW.value,
                   local_blocks=_LOCAL.value, vert_stride=_STRIDE.value),
      warmup=_WARMUP.value, repeats=_REPEATS.value,
      max_bwd_len=_SKIP_BWD_ABOVE.value)
  print(benchmark.format_table(rows))
  if _OUT_DIR.value:
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    meta = {"device": str(jax.devices()[0].device_kind),
            "jax": jax.__version__, "flags": {f: flags.FLAGS[f].value for f in
                                              ("lengths", "cases", "impls",
                                               "batch", "heads", "kv_heads",
                                               "head_dim", "block", "dtype",
                                               "warmup", "repeats",
                                               "triton_tuning")}}
    with open(os.path.join(_OUT_DIR.value, "results.json"), "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)
    peers = json.load(open(_PEERS.value)) if _PEERS.value else []
    plotting.plot_attention_bench(rows, peers, os.path.join(
        _OUT_DIR.value, "attention_bench.png"), title=meta["device"])


if __name__ == "__main__":
  app.run(main)
