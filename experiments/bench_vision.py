r"""Benchmarks the vision ops (MaxViT window/grid, NA, BiFormer routing).

  python -m experiments.bench_vision --out_dir=/tmp/vb        # on the GPU
  python -m experiments.bench_vision --smoke --impls=xla --na_impls=xla \
      --out_dir=/tmp/vb                                       # CPU check

Writes results.json (after every case: a timeout keeps what was measured),
table.md and one PNG per case family; --peers merges the rows of
.peer/peer_variants.py (same shapes; a comma-separated list of JSON files)
into the table and plots. Part routing_memory runs each (stage, impl) in a
fresh process and records the device allocator's peak for fwd+bwd. --merge
writes one report from several runs' results.json.
"""

import json
import os
import subprocess
import sys

from absl import app
from absl import flags

from sparsejax.vision import bench
from sparsejax.vision import bench_report

_OUT = flags.DEFINE_string("out_dir", "/tmp/bench_vision", "Output folder.")
_PARTS = flags.DEFINE_list("parts", ["maxvit", "routing", "na", "na_bias"],
                           "maxvit, na, na_bias, routing, routing_memory.")
_IMPLS = flags.DEFINE_list("impls", ["pallas_triton"],
                           "sj.vision implementations (MaxViT kernel).")
_NA_IMPLS = flags.DEFINE_list("na_impls", ["pallas_mosaic_gpu",
                                           "pallas_triton"],
                              "Implementations for NA and routing.")
_BIAS_IMPLS = flags.DEFINE_list("bias_impls", ["pallas_triton"],
                                "Implementations for na_bias.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes (CPU check).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Warm-up calls.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed repeats (median).")
_PEERS = flags.DEFINE_list("peers", [], "peer_variants.py JSON files.")
_MEMORY_CASE = flags.DEFINE_string(
    "memory_case", "", "Internal: 'INDEX,IMPL' of one routing_memory case "
    "(prints its row as JSON).")
_CASE_TIMEOUT = flags.DEFINE_integer("case_timeout", 40,
                                     "Seconds per routing_memory process.")
_MERGE = flags.DEFINE_list("merge", [], "results.json files of earlier runs: "
                           "write their rows (and --peers) as one report.")


def _memory_rows(cases, impls, log=print):
  rows = []
  for i in range(len(cases)):
    for impl in impls:
      cmd = [sys.executable, "-m", "experiments.bench_vision",
             f"--memory_case={i},{impl}"] + (["--smoke"] if _SMOKE.value
                                              else [])
      try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False,
                             timeout=_CASE_TIMEOUT.value)
        lines = [l for l in res.stdout.splitlines() if l.startswith("{")]
        row = (json.loads(lines[-1]) if lines else dict(
            case="biformer", shape=str(cases[i]), contender=impl, bwd=True,
            error=f"rc {res.returncode}: {res.stderr[-300:]}"))
      except subprocess.TimeoutExpired:
        row = dict(case="biformer", shape=str(cases[i]), contender=impl,
                   bwd=True, error=f"timeout {_CASE_TIMEOUT.value}s")
      rows.append(row)
      log(f"biformer  device peak fwd+bwd {row['contender']} "
          f"{row['shape']}: " + (f"{row['device_peak_mib']:.0f} MiB "
                                 f"(inputs {row['inputs_mib']:.0f})"
                                 if "device_peak_mib" in row
                                 else f"FAILED {row['error']}"))
  return rows


def _part_rows(part, case):
  w, r = _WARMUP.value, _REPEATS.value
  if part == "maxvit":
    return bench.maxvit_rows([case], _IMPLS.value, w, r)
  if part == "na":
    return bench.na_rows([case], _NA_IMPLS.value, w, r,
                         cudnn=not _SMOKE.value)
  if part == "na_bias":
    return bench.na_bias_rows([case], _BIAS_IMPLS.value, w, r)
  if part == "routing":
    return bench.routing_rows([case], _NA_IMPLS.value, w, r)
  raise ValueError(f"unknown part {part!r}")


def main(argv):
  del argv
  cases_of = lambda part: (bench.SMOKE[part] if _SMOKE.value
                           else getattr(bench, part.upper()))
  if _MEMORY_CASE.value:
    i, impl = _MEMORY_CASE.value.split(",")
    print(json.dumps(bench.device_peak_mib(cases_of("routing")[int(i)],
                                           impl)))
    return
  os.makedirs(_OUT.value, exist_ok=True)
  peers = bench_report.load_peers(_PEERS.value)
  rows = []
  if _MERGE.value:
    for path in _MERGE.value:
      if os.path.exists(path):
        with open(path) as f:
          rows += json.load(f)["rows"]
    bench_report.write(rows, peers, _OUT.value)
    return
  for part in _PARTS.value:
    if part == "routing_memory":
      rows += _memory_rows(cases_of("routing"), _NA_IMPLS.value)
      bench_report.write(rows, peers, _OUT.value, plots=False)
      continue
    for case in cases_of(part):
      rows += _part_rows(part, case)
      bench_report.write(rows, peers, _OUT.value, plots=False)
  bench_report.write(rows, peers, _OUT.value)


if __name__ == "__main__":
  app.run(main)
