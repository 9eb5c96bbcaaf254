r"""Times Lightning Attention-2: our implementations, cuDNN dense causal,
per-token flatness and decode; merges the fla / OpenNLPLab peers' JSON.

  python -m experiments.bench_linear --out_dir=/tmp/linear \
      --peers=/tmp/linear/peers.json          # on the H200 (run_h200.sh)
  python -m experiments.bench_linear --smoke --out_dir=/tmp/linear_smoke

Every case is compiled first, in a thread pool (XLA and Triton compiles
dominate a GPU call otherwise), then timed one at a time in priority order
until --max_seconds is spent (the rest are listed as skipped). Writes
results.json (after every case), table.md and PNG plots.
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
_IMPLS = flags.DEFINE_list("impls", ["pallas_triton", "xla"],
                           "sparsejax implementations (the first is the "
                           "one of the length sweep and the table)")
_SHAPES = flags.DEFINE_list("shapes", ["2x16", "1x32"], "batch x heads")
_LENGTHS = flags.DEFINE_list("lengths", ["4096", "16384", "65536"],
                             "fla's lengths")
_XLA_MAX = flags.DEFINE_integer("xla_max_len", 16384,
                                "longest length timed for impl=xla")
_FLAT = flags.DEFINE_list("flat_lengths", ["2048", "8192", "32768",
                                           "131072"],
                          "extra lengths of the per-token sweep (first shape)")
_CUDNN = flags.DEFINE_list("cudnn_lengths", ["32768", "131072"],
                           "lengths for cuDNN dense causal")
_DECODE = flags.DEFINE_list("decode", ["8x16", "64x16", "256x16"],
                            "decode batch x heads")
_SWEEP = flags.DEFINE_string(
    "sweep", "num_splits=2;num_splits=4;num_splits=8:bwd;num_splits=16;"
    "block_v=64,num_warps=4,num_splits=8;num_stages=2;num_stages_dkv=3:bwd",
    "Triton TuningConfig settings tried at B2 T16K H16 (';'-separated; "
    "':bwd' also times forward+backward)")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "d_k = d_v")
_WARMUP = flags.DEFINE_integer("warmup", 2, "warm-up calls")
_REPEATS = flags.DEFINE_integer("repeats", 7, "timed repeats (median)")
_WORKERS = flags.DEFINE_integer("compile_workers", 8, "parallel compiles")
_MAX_S = flags.DEFINE_float("max_seconds", 150.0, "time box for all cases")
_SMOKE = flags.DEFINE_bool("smoke", False, "tiny CPU run of every step")


def _sweep(text):
  """'a=1,b=2:bwd;c=3' -> [(label, kwargs, bwd_too)]."""
  out = []
  for item in filter(None, (x.strip() for x in text.split(";"))):
    spec, _, flag = item.partition(":")
    kw = {k.strip(): int(v) for k, v in (p.split("=") for p in
                                         spec.split(","))}
    out.append((spec, kw, flag == "bwd"))
  return out


def _cases(impls, shapes, lengths, flat, cudnn, sweep, d, smoke):
  """Timed cases in priority order."""
  dtype = jnp.bfloat16
  out = []

  def add(impl, b, h, t, tuning=None, bwd_too=True, tag=""):
    check = (bench.xla_f32_reference if t <= 4096 and impl != "xla" else
             None)
    out.append(bench.Case(f"sparsejax:{impl}{tag}",
                          bench.lightning_contender(impl, tuning),
                          bench.Shape(b, h, t, d), dtype, bwd_too=bwd_too,
                          check=check, tag=tag))

  main = impls[0]
  for b, h in shapes:  # 1. fla's shapes, the main implementation
    for t in lengths:
      add(main, b, h, t)
  for b, h in shapes:  # 2. cuDNN dense causal (and ours) at 32K, 128K
    for t in cudnn:
      if t not in lengths:
        add(main, b, h, t)
      out.append(bench.Case("cudnn dense causal", bench.cudnn_contender,
                            bench.Shape(b, h, t, d), dtype, repeats=3))
  b, h = shapes[0]
  for t in flat:  # 3. time per token from 2K to 128K (with 1. and 2.)
    if t not in lengths and t not in cudnn:
      add(main, b, h, t)
  for impl in impls[1:]:  # 4. the other implementations
    for b, h in shapes:
      for t in lengths:
        if impl != "xla" or t <= _XLA_MAX.value or smoke:
          add(impl, b, h, t)
  if main == "pallas_triton":  # 5. tuning sweep
    from pallas_kernels.gpu.lightning_attention import TuningConfig  # pylint: disable=g-import-not-at-top
    for label, kw, bwd_too in sweep:
      add(main, 2, 16, 16384, TuningConfig(**kw), bwd_too=bwd_too,
          tag=f"[{label}]")
  return out


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  smoke = _SMOKE.value
  d = 16 if smoke else _HEAD_DIM.value
  impls = ["xla"] if smoke else _IMPLS.value
  shapes = ([(1, 2)] if smoke else
            [tuple(map(int, x.split("x"))) for x in _SHAPES.value])
  lengths = [256, 512] if smoke else [int(x) for x in _LENGTHS.value]
  flat = [128, 1024] if smoke else [int(x) for x in _FLAT.value]
  cudnn = [] if smoke else [int(x) for x in _CUDNN.value]
  decode = ([(2, 2)] if smoke else
            [tuple(map(int, x.split("x"))) for x in _DECODE.value])
  sweep = [] if smoke else _sweep(_SWEEP.value)
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

  cases = _cases(impls, shapes, lengths, flat, cudnn, sweep, d, smoke)
  # Compile in the background, time in order as compiles finish.
  pool = concurrent.futures.ThreadPoolExecutor(_WORKERS.value)
  futures = [pool.submit(c.compile) for c in cases]
  for b, h in decode:  # decode first: small, and it overlaps the compiles
    for impl in impls:
      if in_time(f"decode {impl} B{b} H{h}"):
        rows.append(bench.time_decode(impl, b, h, d, steps=4 if smoke
                                      else 32, repeats=repeats))
        save()
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

  peers = []
  if _PEERS.value and os.path.exists(_PEERS.value):
    with open(_PEERS.value) as f:
      peers = bench.peer_rows(json.load(f))
  main_name = f"sparsejax:{impls[0]}"
  timed = [r for r in rows if "seq" in r and "sweep" not in r]
  b, h = shapes[0]
  flat_rows = [r for r in timed if r.get("contender") == main_name and
               r.get("batch") == b and r.get("heads") == h]
  ratio = bench.flatness(flat_rows)
  table = bench.markdown_table(timed, peers, impl=main_name)
  with open(os.path.join(_OUT.value, "table.md"), "w") as f:
    f.write(bench.report(table, rows, ratio, skipped, (b, h)))
  print(table)
  print("per-token max/min:", ratio)
  bench.plot(timed, peers, os.path.join(_OUT.value, "linear_bench.png"))
  bench.plot_flatness(flat_rows, os.path.join(_OUT.value,
                                              "per_token_flatness.png"))
  print(f"wrote {_OUT.value} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
