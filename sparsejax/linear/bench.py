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


def time_decode(impl: str, batch: int, heads: int, d: int, *, steps: int,
                repeats: int, dtype=jnp.bfloat16, log=print) -> dict:
  """One decode step of batch x heads states, `steps` steps per jitted
  call (a lax.fori_loop carrying the state), timed per step."""
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(kk, (batch, heads, d), dtype) * 0.1
             for kk in ks[:3])
  state = jax.random.normal(ks[3], (batch, heads, d, d))
  slopes = jnp.asarray(sj.linear.alibi_slopes(heads))

  @jax.jit
  def run(state):
    def body(_, carry):
      o, s = sj.linear.lightning_decode(q, k, v, carry[1], slopes, impl=impl)
      return carry[0] + o.astype(jnp.float32), s
    return jax.lax.fori_loop(0, steps, body,
                             (jnp.zeros((batch, heads, d)), state))

  row = dict(contender=f"decode:{impl}", batch=batch, heads=heads,
             head_dim=d, steps=steps)
  try:
    ms = benchmark.median_ms(run, (state,), 2, repeats) / steps
    state_bytes = 2.0 * batch * heads * d * d * 4  # read + write, f32
    row.update(us_per_step=ms * 1e3, hbm_fraction=state_bytes / (ms / 1e3) /
               HBM_BYTES_PER_S)
    log(f"decode {impl:14s} B{batch} H{heads} D{d}: {ms * 1e3:8.2f} us/step "
        f"{100 * row['hbm_fraction']:5.1f}% HBM")
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    log(f"decode {impl} B{batch} H{heads}: FAILED {row['error']}")
  return row


# --- peers and tables -------------------------------------------------------


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
          if r.get("contender") == impl and "ms" in r}
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


def plot_flatness(rows, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  series = {}
  for r in rows:
    if "ms" in r:
      key = f"{r['contender']} {'fwd+bwd' if r['bwd'] else 'fwd'}"
      series.setdefault(key, []).append((r["seq"], r["ms_per_mtoken"]))
  for name, pts in sorted(series.items()):
    pts.sort()
    ax.plot(*zip(*pts), "-o", label=name, markersize=3)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("sequence length")
  ax.set_ylabel("ms per million tokens")
  ax.set_title("time per token vs length (flat = linear scaling)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def flatness(rows) -> Dict[str, float]:
  """max / min of ms per token over the lengths, per (contender, pass)."""
  out = {}
  for r in rows:
    if "ms" in r:
      key = f"{r['contender']} {'fwd+bwd' if r['bwd'] else 'fwd'}"
      out.setdefault(key, []).append(r["ms_per_mtoken"])
  return {k: max(v) / min(v) for k, v in out.items() if len(v) > 1}


def report(table: str, rows, ratio, skipped, flat_shape) -> str:
  """table.md: the fla table, cuDNN, flatness, decode, the split sweep."""
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
  lines.append(f"Time per token, max/min over lengths (B{flat_shape[0]} "
               f"H{flat_shape[1]}): " + ", ".join(
                   f"{k}: {v:.3f}" for k, v in ratio.items()))
  lines += ["", "Decode (one step, f32 state read + written):"]
  for r in rows:
    if "us_per_step" in r:
      lines.append(f"- {r['contender']} B{r['batch']} H{r['heads']} "
                   f"D{r['head_dim']}: {r['us_per_step']:.2f} us/step, "
                   f"{100 * r['hbm_fraction']:.0f}% of HBM bandwidth")
  sweep = [r for r in rows if r.get("sweep") and "ms" in r]
  if sweep:
    lines += ["", "Triton tuning sweep (B2 T16384 H16; the default is the "
              "table's row): " + ", ".join(
                  f"{r['sweep']} {'fwd+bwd' if r['bwd'] else 'fwd'} "
                  f"{r['ms']:.3f} ms" for r in sweep)]
  errors = [r for r in rows if "error" in r]
  if errors:
    lines += ["", "Failures:"] + [
        f"- {r['contender']} {r.get('shape', '')}: {r['error']}"
        for r in errors]
  if skipped:
    lines += ["", "Skipped (time box): " + "; ".join(skipped)]
  return "\n".join(lines) + "\n"
