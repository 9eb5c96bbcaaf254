r"""Prefill timings of SeerAttention and MInference against dense cuDNN.

  # one H200 (see benchmarks/learned/run_h200.sh)
  python -m experiments.learned_bench --lengths=32768,65536,131072 \
      --seer_densities=0.5,0.2,0.1 --out_dir=benchmarks/learned/bench
  # CPU smoke (the xla path stands in for cuDNN)
  python -m experiments.learned_bench --lengths=512 --heads=2 --kv_heads=1 \
      --head_dim=32 --block=16 --minference=vertical_slash:64:128 \
      --dtype=float32 --out_dir=/tmp/learned_bench
"""

import json
import os

from absl import app
from absl import flags

from sparsejax.learned import bench
from sparsejax.learned import minference

_LENGTHS = flags.DEFINE_list("lengths", ["32768", "131072"], "lengths")
_SEER = flags.DEFINE_list("seer_densities", ["0.5", "0.1"],
                          "SeerAttention causal block densities")
_SEER_LENGTHS = flags.DEFINE_list(
    "seer_lengths", [], "lengths with Seer cases (default: all)")
_MINF = flags.DEFINE_string("minference", "vertical_slash:1000:6096",
                            "MInference pattern spec")
_PROBS = flags.DEFINE_list("probs_lengths", ["32768"],
                           "lengths that also time block_attention_probs")
_HEADS = flags.DEFINE_integer("heads", 32, "query heads")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "kv heads")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "head dim")
_BLOCK = flags.DEFINE_integer("block", 64, "gate / mask block")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "input dtype")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed calls (median)")
_OUT = flags.DEFINE_string("out_dir", "", "where JSON, table and plot go")


def main(argv):
  del argv
  setup = bench.Setup(heads=_HEADS.value, kv_heads=_KV_HEADS.value,
                      head_dim=_HEAD_DIM.value, block=_BLOCK.value,
                      dtype=_DTYPE.value, repeats=_REPEATS.value)
  lengths = [int(x) for x in _LENGTHS.value]
  seer_lengths = set(int(x) for x in _SEER_LENGTHS.value) or set(lengths)
  rows = []
  for seq in lengths:  # results are rewritten after every length
    rows += bench.run(
        lengths=[seq], setup=setup,
        seer_densities=[float(d) for d in _SEER.value] if seq in seer_lengths
        else [],
        minference_pattern=minference.parse_pattern(_MINF.value),
        probs_lengths=[int(x) for x in _PROBS.value])
    if _OUT.value:
      _write(rows, _OUT.value)
  print(bench.table(rows))


def _write(rows, out_dir):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "bench.json"), "w") as f:
    json.dump(dict(environment=bench.environment(), rows=rows), f, indent=1)
  with open(os.path.join(out_dir, "bench.md"), "w") as f:
    f.write(bench.table(rows) + "\n")
  bench.plot(rows, os.path.join(out_dir, "prefill_speedup.png"))


if __name__ == "__main__":
  app.run(main)
