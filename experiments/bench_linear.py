r"""Times Lightning Attention-2: our implementations, cuDNN dense causal,
per-token flatness and decode; merges the fla / OpenNLPLab peers' rows.

  python -m experiments.bench_linear --out_dir=/tmp/linear \
      --peers=/tmp/linear/peers.json          # on the H200 (run_h200.sh)
  python -m experiments.bench_linear --smoke --out_dir=/tmp/linear_smoke

Decode is timed first (small). Then every case is compiled in a thread pool
(XLA and Triton compiles dominate a GPU call otherwise) and timed one at a
time in priority order, each after its compile, until --max_seconds is
spent (the rest are listed as skipped). With --cache_dir the executables go
to JAX's persistent cache: a --compile_only run beside other GPU work fills
it, and the timing run then loads them. Writes results.json (after every
case), table.md and PNG plots.
"""

import concurrent.futures
import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from sparsejax.linear import bench

_OUT = flags.DEFINE_string("out_dir", "/tmp/bench_linear", "output folder")
_PEERS = flags.DEFINE_string("peers", "", "peer_variants.py JSON to merge")
_PEERS_LOG = flags.DEFINE_string("peers_log", "", "its log (used when the "
                                 "JSON is missing: a run cut short)")
_IMPLS = flags.DEFINE_list("impls", ["pallas_triton", "xla"],
                           "sparsejax implementations (the first is the "
                           "one of the sweeps and the table)")
_SHAPES = flags.DEFINE_list("shapes", ["2x16", "1x32"], "batch x heads")
_LENGTHS = flags.DEFINE_list("lengths", ["4096", "16384", "65536"],
                             "fla's lengths")
_COMPARE = flags.DEFINE_string(
    "compare", "forward=split", "Triton TuningConfig settings also timed "
    "(forward) at every fla shape (';'-separated)")
_EQUAL = flags.DEFINE_integer(
    "equal_work_tokens", 262144, "batch x T of the equal-work per-token "
    "sweep (heads: the first shape's)")
_FLAT = flags.DEFINE_list("flat_lengths", ["2048", "8192", "32768",
                                           "131072"],
                          "lengths of the per-token sweeps (equal work, and "
                          "the first shape's batch)")
_XLA_MAX = flags.DEFINE_integer("xla_max_len", 16384,
                                "longest length timed for impl=xla")
_CUDNN = flags.DEFINE_list("cudnn_lengths", ["32768", "131072"],
                           "lengths for cuDNN dense causal")
_DECODE = flags.DEFINE_list("decode", ["8x16", "64x16", "256x16"],
                            "decode batch x heads")
_DECODE_IMPLS = flags.DEFINE_list("decode_impls",
                                  ["pallas_triton", "xla", "auto"],
                                  "decode implementations")
_SWEEP = flags.DEFINE_string(
    "sweep", "forward=split,num_splits=4;"
    "forward=split,forward_block_v=64,num_splits=2;"
    "forward=split,forward_block_v=64,num_splits=4;"
    "forward=fused,forward_block_v=32,num_stages=2;"
    "forward=fused,forward_block_v=32,num_warps=8;"
    "forward=fused,forward_block_v=64;"
    "num_splits=2:bwd;num_splits=8:bwd;num_stages_dkv=2:bwd",
    "Triton TuningConfig settings tried at B2 T16K H16 (';'-separated; "
    "':bwd' also times forward+backward)")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "d_k = d_v")
_WARMUP = flags.DEFINE_integer("warmup", 2, "warm-up calls")
_REPEATS = flags.DEFINE_integer("repeats", 7, "timed repeats (median)")
_WORKERS = flags.DEFINE_integer("compile_workers", 8, "parallel compiles")
_MAX_S = flags.DEFINE_float("max_seconds", 150.0, "time box for all cases")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False,
                                  "compile every case (into --cache_dir) "
                                  "and exit")
_CACHE = flags.DEFINE_string("cache_dir", "", "JAX persistent compilation "
                             "cache (shared by --compile_only and timing)")
_SMOKE = flags.DEFINE_bool("smoke", False, "tiny CPU run of every step")


def _settings(text):
  """'a=1,b=x:bwd;c=3' -> [(label, kwargs, bwd_too)]."""
  out = []
  for item in filter(None, (x.strip() for x in text.split(";"))):
    spec, _, flag = item.partition(":")
    kw = {}
    for part in spec.split(","):
      key, value = (x.strip() for x in part.split("="))
      kw[key] = int(value) if value.lstrip("-").isdigit() else value
    out.append((spec, kw, flag == "bwd"))
  return out


def _cases(impls, shapes, lengths, compare, equal_work, flat, cudnn, sweep,
           d, smoke):
  """Timed cases in priority order."""
  dtype = jnp.bfloat16
  out = []
  main = impls[0]
  triton = main == "pallas_triton"
  if triton:
    from pallas_kernels.gpu.lightning_attention import TuningConfig  # pylint: disable=g-import-not-at-top

  seen = set()

  def add(impl, b, h, t, tuning=None, bwd_too=True, tag="", series=""):
    if (impl, tag, b, h, t) in seen:
      return
    seen.add((impl, tag, b, h, t))
    shape = bench.Shape(b, h, t, d)
    check = (bench.xla_f32_reference if t <= 4096 and impl != "xla"
             and not tag else None)
    design = (bench.triton_design(shape, dtype, tuning)
              if impl == "pallas_triton" else "")
    out.append(bench.Case(f"sparsejax:{impl}{tag}",
                          bench.lightning_contender(impl, tuning), shape,
                          dtype, bwd_too=bwd_too, check=check, tag=tag,
                          series=series, design=design))

  for b, h in shapes:  # 1. fla's shapes, the main implementation
    for t in lengths:
      add(main, b, h, t)
  if triton:  # 2. other forward designs at fla's shapes
    for label, kw, bwd_too in compare:
      for b, h in shapes:
        for t in lengths:
          add(main, b, h, t, TuningConfig(**kw), bwd_too, f"[{label}]")
  heads = shapes[0][1]
  for t in flat:  # 3. time per token at equal work (batch x T fixed)
    if equal_work // t >= 1:
      add(main, equal_work // t, heads, t, series="equal_work")
  for i, (b, h) in enumerate(shapes):  # 4. lengths at a fixed batch (the
    for t in sorted(set(flat if i == 0 else []) | set(cudnn)):  # first
      add(main, b, h, t)  # shape's, and every shape at cuDNN's lengths)
  for impl in impls[1:]:  # 5. the other implementations
    for b, h in shapes:
      for t in lengths:
        if impl != "xla" or t <= _XLA_MAX.value or smoke:
          add(impl, b, h, t)
  if triton:  # 6. tuning sweep
    for label, kw, bwd_too in sweep:
      add(main, 2, 16, 16384, TuningConfig(**kw), bwd_too, f"[{label}]")
  for b, h in shapes:  # 7. cuDNN dense causal (its times do not change)
    for t in cudnn:
      out.append(bench.Case("cudnn dense causal", bench.cudnn_contender,
                            bench.Shape(b, h, t, d), dtype, repeats=2))
  return out


def _peers():
  if _PEERS.value and os.path.exists(_PEERS.value):
    with open(_PEERS.value) as f:
      return bench.peer_rows(json.load(f)), "json"
  if _PEERS_LOG.value and os.path.exists(_PEERS_LOG.value):
    with open(_PEERS_LOG.value) as f:
      return bench.peer_rows_from_log(f.read()), "log"
  return [], "none"


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  if _CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  smoke = _SMOKE.value
  d = 16 if smoke else _HEAD_DIM.value
  impls = ["xla"] if smoke else _IMPLS.value
  shapes = ([(1, 2)] if smoke else
            [tuple(map(int, x.split("x"))) for x in _SHAPES.value])
  lengths = [256, 512] if smoke else [int(x) for x in _LENGTHS.value]
  flat = [128, 1024] if smoke else [int(x) for x in _FLAT.value]
  equal = 2048 if smoke else _EQUAL.value
  cudnn = [] if smoke else [int(x) for x in _CUDNN.value]
  decode = ([(2, 2)] if smoke else
            [tuple(map(int, x.split("x"))) for x in _DECODE.value])
  decode_impls = ["xla", "auto"] if smoke else _DECODE_IMPLS.value
  compare = [] if smoke else _settings(_COMPARE.value)
  sweep = [] if smoke else _settings(_SWEEP.value)
  warmup, repeats = (1, 2) if smoke else (_WARMUP.value, _REPEATS.value)
  start = time.perf_counter()
  rows, skipped = [], []
  path = os.path.join(_OUT.value, "results.json")

  def save():
    with open(path, "w") as f:
      json.dump(dict(device=str(jax.devices()[0].device_kind), rows=rows,
                     skipped=skipped, wall_s=time.perf_counter() - start),
                f, indent=1)

  def in_time(label):
    if time.perf_counter() - start <= _MAX_S.value:
      return True
    skipped.append(label)
    print(f"skipped (time box): {label}", flush=True)
    return False

  cases = _cases(impls, shapes, lengths, compare, equal, flat, cudnn, sweep,
                 d, smoke)
  if _COMPILE_ONLY.value:
    for b, h in decode:
      for impl in decode_impls:
        try:
          bench.decode_case(impl, b, h, d, steps=4 if smoke else 16)
        except Exception as e:  # pylint: disable=broad-except
          print(f"decode {impl} B{b} H{h}: FAILED {e}")
    with concurrent.futures.ThreadPoolExecutor(_WORKERS.value) as pool:
      done = list(pool.map(lambda c: c.compile(), cases))
    failed = [c for c in done if c.error]
    for c in failed:
      print(f"{c.name} {c.shape.name}: FAILED {c.error}")
    print(f"compiled {len(done) - len(failed)}/{len(done)} cases in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return
  # Decode first and alone (no compiles running beside it).
  for b, h in decode:
    for impl in decode_impls:
      if in_time(f"decode {impl} B{b} H{h}"):
        rows.append(bench.time_decode(impl, b, h, d, steps=4 if smoke
                                      else 16, repeats=repeats))
        save()
  pool = concurrent.futures.ThreadPoolExecutor(_WORKERS.value)
  futures = [pool.submit(c.compile) for c in cases]
  # From a warm cache every executable loads in seconds: time none of them
  # beside the loading. Cold, time each case as soon as it is compiled.
  concurrent.futures.wait(futures, timeout=20 if _CACHE.value else 0)
  for case, fut in zip(cases, futures):
    label = f"{case.name} {case.shape.name}"
    if not in_time(label):
      fut.cancel()
      continue
    fut.result()
    rows.extend(case.rows(warmup=warmup, repeats=repeats))
    save()
  pool.shutdown(wait=False, cancel_futures=True)
  save()

  peers, source = _peers()
  print(f"peers: {len(peers)} rows from {source}")
  peers = bench.with_anchors(peers)
  main_name = f"sparsejax:{impls[0]}"
  timed = [r for r in rows if "seq" in r and "sweep" not in r]
  flat_rows = [r for r in timed if r.get("contender") == main_name and (
      r.get("series") == "equal_work" or (r.get("batch"), r.get("heads")) ==
      shapes[0])]
  ratio = bench.flatness(flat_rows, shapes[0])
  table = bench.markdown_table(timed, peers, impl=main_name)
  with open(os.path.join(_OUT.value, "table.md"), "w") as f:
    f.write(bench.report(table, rows, ratio, skipped))
  print(table)
  print("per-token max/min:", ratio)
  bench.plot([r for r in timed if not r.get("series")], peers,
             os.path.join(_OUT.value, "linear_bench.png"))
  bench.plot_flatness(flat_rows, os.path.join(_OUT.value,
                                              "per_token_flatness.png"),
                      shapes[0])
  print(f"wrote {_OUT.value} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
