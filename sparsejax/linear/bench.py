"""Lightning-attention benchmarks: fla's shapes, length sweeps, decode, cuDNN.

Used by experiments/bench_linear.py (benchmarks/linear/run_h200.sh). Timing
(`time_fn`): the compiled function, warm-up calls, then the median of
repeats, each `inner` back-to-back calls (about 20 ms) closed by one device
sync, on random normal inputs (q, k scaled by d^-1/2), the same shapes for every
contender. Reported per row: ms, useful TFLOP/s of the chunked algorithm
(2 T (C (d_k + d_v) + 2 d_k d_v) per head forward, C = 64, 3.5x for
forward+backward: the peers' convention) and the fraction of HBM bandwidth
against the op's minimal traffic (bf16: q, k, v read and o written once
forward; plus q, k, v, do read and dq, dk, dv written backward).
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import sparsejax as sj
from sparsejax import benchmark

HBM_BYTES_PER_S = 4.3e12  # measured copy bandwidth of our H200
FLOP_CHUNK = 64
BWD_FLOP_FACTOR = 3.5


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int
  heads: int
  seq: int
  head_dim: int = 128

  @property
  def name(self) -> str:
    return f"B{self.batch} T{self.seq} H{self.heads} D{self.head_dim}"


def flops(s: Shape, bwd: bool) -> float:
  d = s.head_dim
  f = 2.0 * s.batch * s.heads * s.seq * (FLOP_CHUNK * 2 * d + 2 * d * d)
  return f * (BWD_FLOP_FACTOR if bwd else 1.0)


def min_bytes(s: Shape, bwd: bool, itemsize: int = 2) -> float:
  """q, k, v read + o written (fwd); + q, k, v, do read, dq, dk, dv written."""
  per_token = 4 * s.head_dim + ((4 + 3) * s.head_dim if bwd else 0)
  return float(s.batch * s.heads * s.seq * per_token * itemsize)


def lightning_inputs(s: Shape, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  shape = (s.batch, s.seq, s.heads, s.head_dim)
  q = (jax.random.normal(ks[0], shape) * s.head_dim ** -0.5).astype(dtype)
  k = (jax.random.normal(ks[1], shape) * s.head_dim ** -0.5).astype(dtype)
  v = jax.random.normal(ks[2], shape, dtype)
  do = jax.random.normal(ks[3], shape, dtype)
  return q, k, v, do


@dataclasses.dataclass
class Case:
  """One contender at one shape: compiled ahead (in a thread pool), then
  timed; `rows()` gives its result rows (or the error)."""
  name: str
  make: Callable  # slopes -> attention fn(q, k, v)
  shape: Shape
  dtype: Any
  bwd_too: bool = True
  check: Optional[Callable] = None
  tag: str = ""
  series: str = ""  # "equal_work": the per-token sweep at equal B * T
  design: str = ""  # the Triton plan (forward design, tile, splits)
  repeats: Optional[int] = None  # overrides the caller's (slow contenders)
  compiled: Dict[Any, Any] = dataclasses.field(default_factory=dict)
  error: Optional[str] = None

  def _fns(self):
    slopes = jnp.asarray(sj.linear.alibi_slopes(self.shape.heads))
    attn = self.make(slopes)

    def fwdbwd(q, k, v, do):
      _, vjp = jax.vjp(attn, q, k, v)
      return vjp(do)

    return slopes, {False: jax.jit(attn), True: jax.jit(fwdbwd)}

  def compile(self):
    """Lowers and compiles (thread-safe: XLA releases the GIL)."""
    try:
      s = self.shape
      spec = jax.ShapeDtypeStruct((s.batch, s.seq, s.heads, s.head_dim),
                                  self.dtype)
      _, fns = self._fns()
      for bwd in ((False, True) if self.bwd_too else (False,)):
        args = (spec,) * (4 if bwd else 3)
        self.compiled[bwd] = fns[bwd].lower(*args).compile()
      if self.check is not None:
        slope_spec = jax.ShapeDtypeStruct((s.heads,), jnp.float32)
        self.compiled["check"] = jax.jit(self.check).lower(
            spec, spec, spec, slope_spec).compile()
    except Exception as e:  # pylint: disable=broad-except
      self.error = f"{type(e).__name__}: {str(e)[:300]}"
    return self

  def rows(self, *, warmup, repeats, log=print) -> List[dict]:
    s = self.shape
    base = dict(contender=self.name, shape=s.name, batch=s.batch,
                heads=s.heads, seq=s.seq, head_dim=s.head_dim)
    if self.tag:
      base["sweep"] = self.tag
    for key in ("series", "design"):
      if getattr(self, key):
        base[key] = getattr(self, key)
    if not self.compiled and self.error is None:
      self.compile()
    if self.error is not None:
      log(f"{self.name:24s} {s.name:26s} FAILED {self.error}")
      return [dict(base, error=self.error)]
    out = []
    try:
      q, k, v, do = lightning_inputs(s, self.dtype)
      check = self.compiled.pop("check", None)
      if check is not None:
        slopes = jnp.asarray(sj.linear.alibi_slopes(s.heads))
        base["rel_err_vs_xla_f32"] = rel_error(
            self.compiled[False](q, k, v), check(q, k, v, slopes))
      for bwd, fn in self.compiled.items():
        ms = time_fn(fn, (q, k, v, do) if bwd else (q, k, v),
                     1 if self.repeats else warmup, self.repeats or repeats)
        row = dict(base, bwd=bwd, ms=ms,
                   ms_per_mtoken=ms / (s.batch * s.seq / 1e6),
                   useful_tflops=flops(s, bwd) / ms / 1e9,
                   hbm_fraction=min_bytes(s, bwd) / (ms / 1e3) /
                   HBM_BYTES_PER_S)
        out.append(row)
        log(format_row(row))
    except Exception as e:  # pylint: disable=broad-except
      out.append(dict(base, error=f"{type(e).__name__}: {str(e)[:300]}"))
      log(f"{self.name:24s} {s.name:26s} FAILED {out[-1]['error']}")
    finally:
      self.compiled.clear()  # free the executables
    return out


def time_fn(fn, args, warmup: int, repeats: int) -> float:
  """Median ms per call over `repeats` timings of `inner` back-to-back calls
  (about 20 ms of work, one device sync each); the first, probing call
  counts as a warm-up (fn is already compiled)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  probe = (time.perf_counter() - t0) * 1e3
  inner = int(max(1, min(50, 20.0 / max(probe, 1e-3))))
  for _ in range(max(0, warmup - 1)):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(inner)])
    times.append((time.perf_counter() - t0) * 1e3 / inner)
  return statistics.median(times)


def triton_design(s: Shape, dtype, tuning=None) -> str:
  """The Triton kernels' plan for a shape: forward design, tiles, splits."""
  from pallas_kernels.gpu import lightning_attention as gla  # pylint: disable=g-import-not-at-top
  t = (tuning or gla.TuningConfig()).resolved(
      s.head_dim, s.head_dim, dtype, s.batch * s.heads, -(-s.seq // 64), 64)
  warps, stages = t.forward_params
  return (f"{t.forward} fwd (v tile {t.forward_block_v}, {warps} warps, "
          f"{stages} stages), {t.num_splits} bwd splits")


def lightning_contender(impl: str, tuning=None) -> Callable:
  return lambda slopes: (lambda q, k, v: sj.linear.lightning_attention(
      q, k, v, slopes, impl=impl, tuning=tuning))


def cudnn_contender(slopes) -> Callable:
  del slopes
  return lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn")


def rel_error(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def xla_f32_reference(q, k, v, slopes):
  return sj.linear.lightning_attention(q.astype(jnp.float32),
                                       k.astype(jnp.float32),
                                       v.astype(jnp.float32), slopes,
                                       impl="xla")


def format_row(r) -> str:
  err = r.get("rel_err_vs_xla_f32")
  return (f"{r['contender']:24s} {r['shape']:26s} "
          f"{'fwd+bwd' if r['bwd'] else 'fwd':7s} {r['ms']:9.3f} ms "
          f"{r['useful_tflops']:6.1f} TF/s {100 * r['hbm_fraction']:5.1f}% "
          f"HBM {r['ms_per_mtoken']:8.3f} ms/Mtok"
          + ("" if err is None else f"  err {err:.1e}"))


# --- decode ---------------------------------------------------------------


def decode_case(impl: str, batch: int, heads: int, d: int, *, steps: int,
                dtype=jnp.bfloat16):
  """(compiled fn, args): `steps` decode steps unrolled in one jitted call
  (no while loop: its per-iteration host sync would be timed), the state
  donated so that every step updates it in place; fn(state, q, k, v) ->
  (state, o of every step)."""
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(kk, (batch, heads, d), dtype) * 0.1
             for kk in ks[:3])
  state = jax.random.normal(ks[3], (batch, heads, d, d))
  slopes = jnp.asarray(sj.linear.alibi_slopes(heads))

  def run(state, q, k, v):
    outs = []
    for _ in range(steps):
      o, state = sj.linear.lightning_decode(q, k, v, state, slopes, impl=impl)
      outs.append(o)
    return state, jnp.stack(outs)

  spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  fn = jax.jit(run, donate_argnums=0).lower(
      spec(state), spec(q), spec(k), spec(v)).compile()
  return fn, (state, q, k, v)


def time_decode(impl: str, batch: int, heads: int, d: int, *, steps: int,
                repeats: int, dtype=jnp.bfloat16, log=print) -> dict:
  """Per-step time of `decode_case` (median of repeats of about 20 ms of
  back-to-back calls, the state carried from call to call)."""
  row = dict(contender=f"decode:{impl}", batch=batch, heads=heads,
             head_dim=d, steps=steps)
  if impl == "auto":
    row["resolved"] = sj.linear.DECODE_REGISTRY.resolve(
        "auto", problem=(jnp.dtype(dtype), d, d)).name
  try:
    fn, (state, q, k, v) = decode_case(impl, batch, heads, d, steps=steps,
                                       dtype=dtype)
    state = jax.block_until_ready(fn(state, q, k, v)[0])  # warm-up
    t0 = time.perf_counter()
    state = jax.block_until_ready(fn(state, q, k, v)[0])
    probe = time.perf_counter() - t0
    inner = int(max(1, min(200, 0.02 / max(probe, 1e-6))))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(inner):
        state, _ = fn(state, q, k, v)
      jax.block_until_ready(state)
      times.append((time.perf_counter() - t0) / (inner * steps))
    sec = statistics.median(times)
    state_bytes = 2.0 * batch * heads * d * d * 4  # read + write, f32
    row.update(us_per_step=sec * 1e6,
               hbm_fraction=state_bytes / sec / HBM_BYTES_PER_S)
    log(f"decode {impl:14s} B{batch} H{heads} D{d}: {sec * 1e6:8.2f} us/step "
        f"{100 * row['hbm_fraction']:5.1f}% HBM"
        + (f" (auto = {row['resolved']})" if "resolved" in row else ""))
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    log(f"decode {impl} B{batch} H{heads}: FAILED {row['error']}")
  return row


# --- peers and tables -------------------------------------------------------


_PEER_LINE = re.compile(r"^linear\s+(.+?)\s+(B\d+ T\d+ H\d+ D\d+)\s+"
                        r"(fwd\+bwd|fwd)\s+([0-9.]+) ms")


def peer_rows_from_log(text: str) -> List[dict]:
  """peer_variants.py's printed rows (its JSON is written only at the end,
  so a run cut by its time box leaves only the log)."""
  results = []
  for line in text.splitlines():
    m = _PEER_LINE.match(line.strip())
    if m:
      results.append(dict(case="linear", contender=m.group(1).strip(),
                          shape=m.group(2), bwd=m.group(3) == "fwd+bwd",
                          ms=float(m.group(4))))
  return peer_rows(dict(results=results))


def peer_rows(peers: dict) -> List[dict]:
  """Rows of peer_variants.py's JSON (case 'linear') in our row format."""
  out = []
  for r in (peers or {}).get("results", []):
    if r.get("case") != "linear" or "ms" not in r:
      continue
    f = {x[0]: x[1:] for x in r["shape"].split()}  # "B2 T4096 H16 D128"
    out.append(dict(contender=r["contender"], shape=r["shape"],
                    batch=int(f["B"]), seq=int(f["T"]), heads=int(f["H"]),
                    head_dim=int(f["D"]), bwd=r["bwd"], ms=r["ms"]))
  return out


# fla on our H200 in an earlier call (issue #12): used for a shape only when
# this call's peers have no row for it, and marked so in the table.
ISSUE_ANCHORS = [
    ("fla chunk_simple_gla", "B2 T16384 H16 D128", False, 0.397),
    ("fla chunk_simple_gla", "B2 T16384 H16 D128", True, 1.71),
    ("fla chunk_simple_gla", "B2 T65536 H16 D128", False, 1.54),
    ("fla chunk_simple_gla", "B2 T65536 H16 D128", True, 6.69),
    ("fla fused_chunk_simple_gla", "B1 T4096 H32 D128", False, 0.211),
    ("fla fused_chunk_simple_gla", "B1 T4096 H32 D128", True, 1.20),
]


def with_anchors(peers: Sequence[dict]) -> List[dict]:
  """peers plus ISSUE_ANCHORS rows for (shape, pass) keys they lack."""
  have = {(p["shape"], p["bwd"]) for p in peers
          if p["contender"].startswith("fla")}
  extra = [dict(case="linear", contender=f"{name} (earlier call)",
                shape=shape, bwd=bwd, ms=ms)
           for name, shape, bwd, ms in ISSUE_ANCHORS
           if (shape, bwd) not in have]
  return list(peers) + peer_rows(dict(results=extra))


def best_by(rows, key) -> Dict:
  out = {}
  for r in rows:
    if "ms" in r:
      k = key(r)
      if k not in out or r["ms"] < out[k]["ms"]:
        out[k] = r
  return out


def markdown_table(ours: Sequence[dict], peers: Sequence[dict],
                   impl: str = "sparsejax:pallas_triton") -> str:
  """ours vs the faster fla kernel per (shape, pass)."""
  fla = best_by([p for p in peers if p["contender"].startswith("fla")],
                lambda r: (r["shape"], r["bwd"]))
  mine = {(r["shape"], r["bwd"]): r for r in ours
          if r.get("contender") == impl and "ms" in r
          and not r.get("series") and not r.get("sweep")}
  lines = ["| shape | pass | sparsejax ms | % HBM | faster fla | fla ms | "
           "speed-up |", "|---|---|---|---|---|---|---|"]
  for (shape, bwd), r in sorted(mine.items(), key=lambda x: (
      x[1]["batch"], x[1]["seq"], x[0][1])):
    p = fla.get((shape, bwd))
    lines.append(
        f"| {shape} | {'fwd+bwd' if bwd else 'fwd'} | {r['ms']:.3f} | "
        f"{100 * r['hbm_fraction']:.0f}% | "
        + (f"{p['contender']} | {p['ms']:.3f} | {p['ms'] / r['ms']:.2f}x |"
           if p else "n/a | | |"))
  return "\n".join(lines)


def plot(rows, peers, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  shapes = sorted({(r["batch"], r["heads"]) for r in rows if "ms" in r})
  fig, axes = plt.subplots(len(shapes), 2, figsize=(13, 4.5 * len(shapes)),
                           squeeze=False)
  for i, (b, h) in enumerate(shapes):
    for j, bwd in enumerate((False, True)):
      ax = axes[i][j]
      series = {}
      for r in list(rows) + list(peers):
        if "ms" in r and (r["batch"], r["heads"]) == (b, h) and (
            r["bwd"] == bwd):
          series.setdefault(r["contender"], []).append((r["seq"], r["ms"]))
      for name, pts in sorted(series.items()):
        pts.sort()
        peer = not name.startswith(("sparsejax", "cudnn"))
        ax.plot(*zip(*pts), "--" if peer else "-o", label=name, markersize=3)
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("sequence length")
      ax.set_ylabel("ms (median)")
      ax.set_title(f"B{b} H{h} D128 {'forward+backward' if bwd else 'forward'}")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _flat_keys(r, fixed) -> List[str]:
  """The per-token series a row belongs to: equal work (batch x T fixed)
  and/or the fixed (batch, heads)."""
  keys = []
  if r.get("series") == "equal_work":
    keys.append("equal work")
  if (r["batch"], r["heads"]) == tuple(fixed):
    keys.append(f"B{r['batch']} H{r['heads']}")
  return [f"{r['contender']} {'fwd+bwd' if r['bwd'] else 'fwd'} ({k})"
          for k in keys]


def plot_flatness(rows, path: str, fixed=(2, 16)):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  series = {}
  for r in rows:
    if "ms" in r:
      for key in _flat_keys(r, fixed):
        series.setdefault(key, []).append((r["seq"], r["ms_per_mtoken"]))
  for name, pts in sorted(series.items()):
    pts.sort()
    ax.plot(*zip(*pts), "-o" if "equal work" in name else "--o", label=name,
            markersize=3)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("sequence length")
  ax.set_ylabel("ms per million tokens")
  ax.set_title("time per token vs length (equal work: batch x T fixed)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def flatness(rows, fixed=(2, 16)) -> Dict[str, float]:
  """max / min of ms per token over the lengths, per (contender, pass,
  series: equal work, or the fixed batch x heads)."""
  out = {}
  for r in rows:
    if "ms" in r:
      for key in _flat_keys(r, fixed):
        out.setdefault(key, []).append(r["ms_per_mtoken"])
  return {k: max(v) / min(v) for k, v in out.items() if len(v) > 1}


def report(table: str, rows, ratio, skipped) -> str:
  """table.md: the fla table, cuDNN, flatness, decode, the tuning sweep."""
  lines = [table, ""]
  cudnn = {(r["shape"], r["bwd"]): r for r in rows
           if r.get("contender") == "cudnn dense causal" and "ms" in r}
  ours = {(r["shape"], r["bwd"]): r for r in rows
          if r.get("contender", "").startswith("sparsejax") and "ms" in r
          and "sweep" not in r}
  if cudnn:
    lines += ["| shape | pass | cuDNN dense causal ms | ours ms | speed-up |",
              "|---|---|---|---|---|"]
    for key, c in sorted(cudnn.items()):
      o = ours.get(key)
      lines.append(f"| {key[0]} | {'fwd+bwd' if key[1] else 'fwd'} | "
                   f"{c['ms']:.3f} | " + (f"{o['ms']:.3f} | "
                                          f"{c['ms'] / o['ms']:.1f}x |"
                                          if o else " | |"))
    lines.append("")
  lines.append("Time per token, max/min over 2K-128K (target 1.1 at equal "
               "work): " + ", ".join(f"{k}: {v:.3f}"
                                     for k, v in sorted(ratio.items())))
  designs = sorted({(r["shape"], r["design"]) for r in rows
                    if r.get("design") and "sweep" not in r})
  if designs:
    lines += ["", "Triton plans (default tuning): " + "; ".join(
        f"{shape}: {d}" for shape, d in designs)]
  lines += ["", "Decode (one step, f32 state read + written):"]
  for r in rows:
    if "us_per_step" in r:
      lines.append(f"- {r['contender']} B{r['batch']} H{r['heads']} "
                   f"D{r['head_dim']}: {r['us_per_step']:.2f} us/step, "
                   f"{100 * r['hbm_fraction']:.0f}% of HBM bandwidth"
                   + (f" (auto = {r['resolved']})" if r.get("resolved")
                      else ""))
  sweep = [r for r in rows if r.get("sweep") and "ms" in r]
  if sweep:
    lines += ["", "Triton tuning sweep (ms; x: speed-up over the default "
              "at the same shape and pass):", "",
              "| shape | setting | pass | ms | x |", "|---|---|---|---|---|"]
    for r in sorted(sweep, key=lambda r: (r["shape"], r["sweep"],
                                          r["bwd"])):
      d = ours.get((r["shape"], r["bwd"]))
      lines.append(f"| {r['shape']} | {r['sweep']} | "
                   f"{'fwd+bwd' if r['bwd'] else 'fwd'} | {r['ms']:.3f} | "
                   + (f"{d['ms'] / r['ms']:.2f} |" if d else " |"))
  errors = [r for r in rows if "error" in r]
  if errors:
    lines += ["", "Failures:"] + [
        f"- {r['contender']} {r.get('shape', '')}: {r['error']}"
        for r in errors]
  if skipped:
    lines += ["", "Skipped (time box): " + "; ".join(skipped)]
  return "\n".join(lines) + "\n"
