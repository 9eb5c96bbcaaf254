r"""Benchmarks the vision ops (MaxViT window/grid, NA, BiFormer routing).

  python -m experiments.bench_vision --out_dir=/tmp/vb        # on the GPU
  python -m experiments.bench_vision --smoke --impls=xla --out_dir=/tmp/vb

Writes results.json, table.md and one PNG per case family; --peers merges
the rows of .peer/peer_variants.py (same shapes) into the table and plots.
"""

import json
import os

from absl import app
from absl import flags

from sparsejax.vision import bench
from sparsejax.vision import bench_report

_OUT = flags.DEFINE_string("out_dir", "/tmp/bench_vision", "Output folder.")
_PARTS = flags.DEFINE_list("parts", ["maxvit", "routing", "na"],
                           "maxvit, na, routing.")
_IMPLS = flags.DEFINE_list("impls", ["pallas_triton"],
                           "sj.vision implementations (MaxViT kernel).")
_NA_IMPLS = flags.DEFINE_list("na_impls", ["pallas_mosaic_gpu",
                                           "pallas_triton"],
                              "Implementations for NA and routing.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes (CPU check).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Warm-up calls.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed repeats (median).")
_PEERS = flags.DEFINE_string("peers", "", "peer_variants.py JSON to merge.")


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  smoke = _SMOKE.value
  rows = []
  path = os.path.join(_OUT.value, "results.json")
  for part in _PARTS.value:
    cases = bench.SMOKE[part] if smoke else getattr(bench, part.upper())
    if part == "maxvit":
      rows += bench.maxvit_rows(cases, _IMPLS.value, _WARMUP.value,
                                _REPEATS.value)
    elif part == "na":
      rows += bench.na_rows(cases, _NA_IMPLS.value, _WARMUP.value,
                            _REPEATS.value, cudnn=not smoke)
    elif part == "routing":
      rows += bench.routing_rows(cases, _NA_IMPLS.value, _WARMUP.value,
                                 _REPEATS.value)
    with open(path, "w") as f:  # after every part: a timeout keeps the rest
      json.dump(dict(rows=rows), f, indent=1)
  peers = bench_report.load_peers(_PEERS.value) if _PEERS.value else []
  bench_report.write(rows, peers, _OUT.value)


if __name__ == "__main__":
  app.run(main)
