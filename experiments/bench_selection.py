r"""Times decode: dense paged, Quest, Double Sparsity, TidalDecode, MoA.

  python -m experiments.bench_selection --lengths=32768,131072 --tune \
      --peers=$OUT/peers.json --out_dir=$OUT/selection

Defaults: batch 8, 32 q / 8 kv heads, head_dim 128, bf16, pages of 16;
Quest 2048 tokens, Double Sparsity 1/16 tokens and channels, TidalDecode
128 and 2048 tokens, MoA spans beta 1/32..1/4 per kv head (mean 0.117).
--peers reads benchmarks/decode/peer_sdpa_decode.py's JSON (torch SDPA in
the same session). Writes selection.json, selection.txt and two PNGs. On
CPU: --smoke (tiny shapes, xla and interpret mode).
"""

import dataclasses
import json
import os

from absl import app
from absl import flags
import jax

from sparsejax.inference import selection_bench
from sparsejax.inference import selection_plots

_LENGTHS = flags.DEFINE_list("lengths", ["32768", "131072"], "cache lengths")
_INCLUDE = flags.DEFINE_list("include", None, "contender name prefixes "
                             f"(default all: {selection_bench.NAMES})")
_BATCH = flags.DEFINE_integer("batch", 8, "sequences")
_HEADS = flags.DEFINE_integer("heads", 32, "q heads")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "kv heads")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "head dim")
_PAGE = flags.DEFINE_integer("page_size", 16, "tokens per page")
_QUEST = flags.DEFINE_integer("quest_budget", 2048, "Quest token budget")
_IMPL = flags.DEFINE_string("impl", "pallas_triton", "decode impl")
_TUNE = flags.DEFINE_bool("tune", False, "sweep the Triton kernel's tuning "
                          "at the first length, keep the best")
_PEERS = flags.DEFINE_string("peers", "", "torch SDPA JSON (same session)")
_WARMUP = flags.DEFINE_integer("warmup", 3, "warm-up calls")
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed repeats (median)")
_INNER = flags.DEFINE_integer("inner", 10, "calls per repeat, one sync")
_SMOKE = flags.DEFINE_bool("smoke", False, "tiny CPU run (xla, interpret)")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "where results go")


def tunings():
  from pallas_kernels.gpu.paged_decode import TuningConfig  # pylint: disable=g-import-not-at-top
  # The default first: it is what every other contender runs if all fail.
  # 128-token steps hold 64 KB of K and V per stage in shared memory: one or
  # two programs per SM; 64-token steps fit three. 256-token steps at 2
  # stages may not fit (a compile error is a row, not a crash).
  return (None, TuningConfig(block_tokens=64, num_stages=3),
          TuningConfig(num_stages=3), TuningConfig(num_splits=32),
          TuningConfig(block_tokens=64, target_programs=2048),
          TuningConfig(block_tokens=256, num_warps=8))


def add_peers(rows, peers):
  """Peer rows (torch SDPA) in the table, and speed-ups against them."""
  ok = [p for p in peers if "us_per_step" in p]
  for p in ok:
    rows.append(dict(name=p["impl"], length=p["length"],
                     us_per_step=p["us_per_step"],
                     read_tb_per_s=p.get("read_tb_per_s"), peer=True))
  for r in rows:
    best = [p["us_per_step"] for p in ok if p["length"] == r["length"]]
    if best and "us_per_step" in r and not r.get("peer"):
      r["speedup_vs_torch_sdpa"] = min(best) / r["us_per_step"]


def main(argv):
  del argv
  setup = selection_bench.Setup(
      batch=_BATCH.value, heads=_HEADS.value, kv_heads=_KV_HEADS.value,
      head_dim=_HEAD_DIM.value, page_size=_PAGE.value,
      quest_budget=_QUEST.value, impl=_IMPL.value)
  lengths = [int(x) for x in _LENGTHS.value]
  tk = dict(warmup=_WARMUP.value, repeats=_REPEATS.value, inner=_INNER.value)
  if _SMOKE.value:
    setup = dataclasses.replace(
        setup, batch=2, heads=4, kv_heads=2, head_dim=16, dtype="float32",
        page_size=8, quest_budget=64, quest_pages=(8, 16),
        tidal_budgets=(16, 64),
        moa_betas=(0.25, 0.5), impl="pallas_triton", interpret=True,
        dense_ref="dense_xla")
    lengths = [256]
    tk = dict(warmup=0, repeats=1, inner=1)
  result = selection_bench.run(
      setup, lengths, include=_INCLUDE.value,
      tunings=tunings() if _TUNE.value and not _SMOKE.value else (None,),
      **tk)
  peers = []
  if _PEERS.value and os.path.exists(_PEERS.value):
    with open(_PEERS.value) as f:
      peers = json.load(f)
  add_peers(result["rows"], peers)
  table = selection_bench.format_table(result["rows"])
  print(table)
  if _OUT_DIR.value:
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    result["meta"] = dict(device=jax.devices()[0].device_kind,
                          jax=jax.__version__,
                          setup=dataclasses.asdict(setup), lengths=lengths,
                          timing=tk)
    result["peers"] = peers
    with open(os.path.join(_OUT_DIR.value, "selection.json"), "w") as f:
      json.dump(result, f, indent=1, default=str)
    with open(os.path.join(_OUT_DIR.value, "selection.txt"), "w") as f:
      f.write(table + "\n")
    selection_plots.decode_times(result["rows"], peers, os.path.join(
        _OUT_DIR.value, "decode_us_per_step.png"))
    selection_plots.speedup_vs_bytes(result["rows"], os.path.join(
        _OUT_DIR.value, "speedup_vs_bytes.png"))


if __name__ == "__main__":
  app.run(main)
