"""Scatterbrain timing against the exact block-sparse kernel on the same
support and dense cuDNN (experiments/bench_scatterbrain.py; H200 numbers in
benchmarks/scatterbrain/).

Every contender gets the same random bf16 q/k/v/do; a case's support is a
local window (`sliding_window`, |q - kv| < window bidirectional, the
`window` latest keys causal) in 128-blocks. Timing is
`sparsejax.benchmark.median_ms`: compile, warm-up, then the median of
device-synchronised repeats. Cases run in the given order until
`deadline` (seconds from the start), so a tight wall budget still yields
the first cases.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import sparsejax as sj
from sparsejax import benchmark
from sparsejax import lowrank


@dataclasses.dataclass(frozen=True)
class Case:
  seq: int
  heads: int
  head_dim: int
  causal: bool
  window: int = 256
  num_features: int = 32
  block: int = 128
  batch: int = 1

  @property
  def name(self):
    kind = "causal" if self.causal else "bidir"
    return (f"{kind} L{self.seq} H{self.heads} d{self.head_dim} "
            f"w{self.window} m{self.num_features}")

  def mask(self):
    return sj.masks.sliding_window(self.seq, self.window, causal=self.causal,
                                   block_size=self.block)


def parse_case(text: str) -> Case:
  """'bidir:32768:16:128' (kind:seq:heads:head_dim[:window[:features]])."""
  parts = text.split(":")
  if parts[0] not in ("bidir", "causal") or not 4 <= len(parts) <= 6:
    raise ValueError(f"case must be kind:seq:heads:head_dim[:window["
                     f":features]] with kind bidir|causal, got {text!r}")
  nums = [int(p) for p in parts[1:]]
  kw = dict(zip(("window", "num_features"), nums[3:]))
  return Case(nums[0], nums[1], nums[2], parts[0] == "causal", **kw)


def parse_impl(text: str):
  """'pallas_triton@sub_kv_fwd=64+num_warps_fwd=8' -> (impl, TuningConfig)
  (the Triton kernel's settings); a bare name -> (name, None)."""
  impl, _, spec = text.partition("@")
  if not spec:
    return impl, None
  from pallas_kernels.gpu import scatterbrain_attention as sba  # pylint: disable=g-import-not-at-top
  kw = {}
  for item in spec.split("+"):
    key, _, value = item.partition("=")
    kw[key.strip()] = int(value)
  return impl, sba.TuningConfig(**kw)


def contenders(case: Case, impls) -> dict[str, Optional[Callable]]:
  """name -> attention fn(q, k, v) on the case (None: not applicable)."""
  mask = case.mask()
  proj = lowrank.orthogonal_gaussian_projection(
      jax.random.key(7), case.num_features, case.head_dim)
  out = {}
  for impl in impls:
    if impl == "cudnn":
      out["dense cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=case.causal, implementation="cudnn")
    elif impl.startswith("block_sparse:"):
      bs = impl.split(":", 1)[1]
      out[f"block-sparse {bs}"] = (
          lambda q, k, v, bs=bs: sj.attention(q, k, v, mask, impl=bs))
    else:
      name, tuning = parse_impl(impl)
      out[f"scatterbrain {impl}"] = (
          lambda q, k, v, name=name, tuning=tuning:
          lowrank.scatterbrain_attention(q, k, v, mask, proj,
                                         causal=case.causal, impl=name,
                                         tuning=tuning))
  return out


def check(case: Case, impl: str, seed=0) -> float:
  """Relative L2 error of the output and each gradient of `impl` against
  impl="xla" (same arithmetic in jnp) on the case's inputs."""
  q, k, v, do = benchmark.random_inputs(case.batch, case.seq, case.heads,
                                        case.heads, case.head_dim,
                                        jnp.bfloat16, seed)
  fns = contenders(case, [impl, "xla"])
  got, want = (jax.jit(lambda q, k, v, do, f=f: benchmark_vjp(f, q, k, v, do))(
      q, k, v, do) for f in fns.values())
  return max(benchmark.max_rel_error(g, w) for g, w in zip(got, want))


def benchmark_vjp(f, q, k, v, do):
  out, vjp = jax.vjp(f, q, k, v)
  return (out,) + vjp(do)


def run(cases, impls, *, warmup: int, repeats: int, deadline: float,
        log=print) -> list[dict]:
  """Rows {case, impl, seq, backward, ms, ratio_vs_block_sparse_*}."""
  start = time.perf_counter()
  rows = []
  for case in cases:
    if time.perf_counter() - start > deadline:
      log(f"deadline reached: skipping {case.name} and later cases")
      break
    q, k, v, do = benchmark.random_inputs(case.batch, case.seq, case.heads,
                                          case.heads, case.head_dim,
                                          jnp.bfloat16)
    base = {}
    for name, attn in contenders(case, impls).items():
      fwd, fwdbwd = benchmark.fwd_and_fwdbwd(attn)
      for bwd in (False, True):
        row = dict(case=case.name, impl=name, seq=case.seq, heads=case.heads,
                   head_dim=case.head_dim, causal=case.causal,
                   window=case.window, num_features=case.num_features,
                   backward=bwd)
        try:
          args = (q, k, v, do) if bwd else (q, k, v)
          row["ms"] = benchmark.median_ms(fwdbwd if bwd else fwd, args,
                                          warmup, repeats)
        except Exception as e:  # pylint: disable=broad-except
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if name.startswith("block-sparse") and "ms" in row:
          base[(name, bwd)] = row["ms"]
        rows.append(row)
        log(format_row(row))
    for r in rows:
      if r["case"] == case.name and "ms" in r:
        for (bname, bwd), ms in base.items():
          if bwd == r["backward"]:
            r[f"x_vs_{bname.replace(' ', '_')}"] = r["ms"] / ms
  return rows


def format_row(r) -> str:
  if "ms" not in r:
    return f"{r['case']:40s} {r['impl']:34s} FAILED {r['error']}"
  return (f"{r['case']:40s} {r['impl']:34s} "
          f"{'fwd+bwd' if r['backward'] else 'fwd':7s} {r['ms']:9.3f} ms")


def table(rows) -> str:
  """Markdown: ms per contender, and Scatterbrain's ratio to each exact
  block-sparse kernel on the same support."""
  lines = ["| case | pass | contender | ms | x block-sparse auto | "
           "x block-sparse pallas_triton |", "|---|---|---|---|---|---|"]
  for r in rows:
    if "ms" not in r:
      lines.append(f"| {r['case']} | {'fwd+bwd' if r['backward'] else 'fwd'}"
                   f" | {r['impl']} | failed: {r['error'][:80]} | | |")
      continue
    ratio = lambda key: (f"{r[key]:.2f}" if key in r and
                         r["impl"].startswith("scatterbrain") else "")
    lines.append(f"| {r['case']} | {'fwd+bwd' if r['backward'] else 'fwd'} | "
                 f"{r['impl']} | {r['ms']:.3f} | "
                 f"{ratio('x_vs_block-sparse_auto')} | "
                 f"{ratio('x_vs_block-sparse_pallas_triton')} |")
  return "\n".join(lines)


def summary(rows) -> dict:
  """Worst Scatterbrain ratio to each block-sparse kernel per pass."""
  out = {}
  for key in ("x_vs_block-sparse_auto", "x_vs_block-sparse_pallas_triton"):
    for bwd in (False, True):
      vals = [r[key] for r in rows if key in r and r["backward"] == bwd
              and r["impl"].startswith("scatterbrain")]
      if vals:
        out[f"{key} {'fwd+bwd' if bwd else 'fwd'} max"] = float(np.max(vals))
  return out
