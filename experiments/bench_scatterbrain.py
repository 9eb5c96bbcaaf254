r"""Times Scatterbrain against the exact block-sparse kernel on the same
support and dense cuDNN; writes JSON, a markdown table and a plot.

  python -m experiments.bench_scatterbrain --out_dir=/tmp/sb_bench
  # CPU smoke (tiny sizes, jnp paths only)
  python -m experiments.bench_scatterbrain --smoke --out_dir=/tmp/sb_bench
"""

import json
import os

from absl import app
from absl import flags

from sparsejax import plotting
from sparsejax.lowrank import bench

_CASES = flags.DEFINE_list(
    "cases", ["bidir:8192:16:128", "bidir:32768:16:128",
              "bidir:131072:16:128", "bidir:32768:32:64",
              "causal:32768:16:128"],
    "kind:seq:heads:head_dim[:window[:features]] (window: sliding_window's "
    "units; bidirectional sees 2 * window - 1 keys).")
_IMPLS = flags.DEFINE_list(
    "impls", ["auto", "block_sparse:auto", "block_sparse:pallas_triton",
              "cudnn"],
    "Scatterbrain impls, block_sparse:<sj.attention impl>, cudnn.")
_CHECK = flags.DEFINE_list("check", ["pallas_triton"],
                           "Impls checked against impl='xla' on the first "
                           "case (output and gradients).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Warm-up calls after compile.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median).")
_DEADLINE = flags.DEFINE_float("deadline", 1e9,
                               "Seconds after which no new case starts.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny CPU run of the script.")
_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/sb_bench", "Output folder.")


def main(argv):
  del argv
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  cases = [bench.parse_case(c) for c in _CASES.value]
  impls, check = _IMPLS.value, _CHECK.value
  if _SMOKE.value:
    cases = [bench.Case(256, 2, 64, False, window=32, block=64),
             bench.Case(256, 2, 64, True, window=32, block=64)]
    impls, check = ["xla", "block_sparse:xla"], ["reference"]
  out = {"cases": [c.name for c in cases], "impls": impls, "checks": {}}
  for impl in check:
    err = bench.check(cases[0], impl)
    out["checks"][impl] = err
    print(f"check {impl} vs xla on {cases[0].name}: max rel L2 error "
          f"{err:.2e} ({'ok' if err < 2e-2 else 'TOO LARGE'})")
  rows = bench.run(cases, impls, warmup=_WARMUP.value,
                   repeats=_REPEATS.value, deadline=_DEADLINE.value)
  out["rows"], out["summary"] = rows, bench.summary(rows)
  with open(os.path.join(_OUT_DIR.value, "results.json"), "w") as f:
    json.dump(out, f, indent=1)
  table = bench.table(rows)
  with open(os.path.join(_OUT_DIR.value, "table.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  print(json.dumps(out["summary"], indent=1))
  bidir = [dict(r, case=r["head_dim"]) for r in rows
           if not r["causal"] and r["heads"] == cases[0].heads
           and r["head_dim"] == cases[0].head_dim]
  plotting.plot_attention_bench(
      [dict(r, case="") for r in bidir], [],
      os.path.join(_OUT_DIR.value, "bench.png"),
      title=f"(bidirectional local window, H{cases[0].heads} "
            f"d{cases[0].head_dim}, bf16)")


if __name__ == "__main__":
  app.run(main)
