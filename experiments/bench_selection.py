r"""Times decode: dense paged, Quest, Double Sparsity, TidalDecode, MoA.

  python -m experiments.bench_selection --lengths=32768,131072 --tune \
      --peers=$OUT/peers.json --out_dir=$OUT/selection

Defaults: batch 8, 32 q / 8 kv heads, head_dim 128, bf16, pages of 16;
Quest 2048 tokens, Double Sparsity 1/16 tokens and channels, TidalDecode
128 and 2048 tokens, MoA spans beta 1/32..1/4 per kv head (mean 0.117).
--peers reads benchmarks/decode/peer_sdpa_decode.py's JSON (torch SDPA in
the same session). Writes selection_rows.jsonl as rows come, then
selection.json, selection.txt and two PNGs; --budget_s stops starting
cases (a cut-short run still writes them); --report_only writes them from
the rows of a run that was killed. On CPU: --smoke (tiny shapes, interpret
mode).
"""

import time

_START = time.monotonic()  # --budget_s counts from here, imports included

import dataclasses  # pylint: disable=g-import-not-at-top,wrong-import-order
import json  # pylint: disable=g-import-not-at-top,wrong-import-order
import os  # pylint: disable=g-import-not-at-top,wrong-import-order
import sys  # pylint: disable=g-import-not-at-top,wrong-import-order

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
_BUDGET = flags.DEFINE_float("budget_s", None, "no case starts this many "
                             "seconds after the process started (the rest "
                             "are 'skipped' rows)")
_SMOKE = flags.DEFINE_bool("smoke", False, "tiny CPU run (xla, interpret)")
_REPORT = flags.DEFINE_bool("report_only", False, "only write the outputs "
                            "from out_dir/selection_rows.jsonl")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "where results go")


def tunings():
  from pallas_kernels.gpu.paged_decode import TuningConfig  # pylint: disable=g-import-not-at-top
  if _SMOKE.value:  # the sweep's code path at the smoke shapes
    return (None, TuningConfig(block_tokens=16, num_splits=2))
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


def setup_and_timing():
  """(Setup, lengths, timing kwargs) from the flags."""
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
  return setup, lengths, tk


def rows_file():
  return os.path.join(_OUT_DIR.value, "selection_rows.jsonl")


def from_rows(setup):
  """The result of a run that was cut short, from its streamed rows."""
  rows, tune = [], []
  with open(rows_file()) as f:
    for line in f:
      row = json.loads(line)
      if isinstance(row, dict):
        (tune if "tuning_index" in row else rows).append(row)
  selection_bench.add_derived(rows, setup)
  tune.sort(key=lambda r: r.get("us_per_step", float("inf")))
  return dict(rows=rows, tuning=tune, cut_short=True, from_rows=True,
              best_tuning=tune[0].get("tuning") if tune else None)


def write_outputs(result, setup, lengths, tk):
  peers = []
  if _PEERS.value and os.path.exists(_PEERS.value):
    with open(_PEERS.value) as f:
      peers = json.load(f)
  add_peers(result["rows"], peers)
  table = selection_bench.format_table(result["rows"])
  print(table)
  if not _OUT_DIR.value:
    return
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


def main(argv):
  del argv
  setup, lengths, tk = setup_and_timing()
  if _REPORT.value:
    write_outputs(from_rows(setup), setup, lengths, tk)
    return
  log = print
  if _OUT_DIR.value:  # rows as they come, in case the run is cut short
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    open(rows_file(), "w").close()

    def log(row):
      print(row, flush=True)
      with open(rows_file(), "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
  result = selection_bench.run(
      setup, lengths, include=_INCLUDE.value, log=log,
      budget_s=(None if _BUDGET.value is None else
                _BUDGET.value - (time.monotonic() - _START)),
      tunings=tunings() if _TUNE.value else (None,),
      **tk)
  write_outputs(result, setup, lengths, tk)
  if result["cut_short"]:
    # Background compiles of the cases it skipped would hold the exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main)
