"""Prefill timings of the learned family against dense cuDNN.

  rows = bench.run(lengths=(32768, 131072), seer_densities=(0.5, 0.1))

Every case times the whole prefill attention of one layer (B, L, H, D) in
`sparsejax.benchmark.median_ms` style (compile, warm-up, median of
synchronised repeats, random normal inputs, the same q/k/v for every
contender): "cudnn" dense causal (`jax.nn.dot_product_attention`), "seer"
(gate scores + selection + BlockMask + sparse attention; the gate has random
weights: speed depends only on the kept count, which top-k fixes),
"minference" (the vertical-slash estimate + BlockMask + attention), each also
timed as its mask alone (the forward lists a prefill reads) and with its
mask prebuilt ("attention alone"; the Seer densities share one compile:
their lists have equal widths), and
`block_attention_probs` (the distillation target) beside the dense forward.
Off GPU the dense contender is the core's xla path instead of cuDNN.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sparsejax as sj
from sparsejax import benchmark
from sparsejax.learned import block_lists
from sparsejax.learned import gate as gate_lib
from sparsejax.learned import minference


@dataclasses.dataclass(frozen=True)
class Setup:
  batch: int = 1
  heads: int = 32
  kv_heads: int = 8
  head_dim: int = 128
  block: int = 64
  dtype: str = "bfloat16"
  impl: str = "auto"
  warmup: int = 2
  repeats: int = 5


def _dense(setup: Setup) -> Callable:
  if jax.default_backend() == "gpu":
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn")
  return lambda q, k, v: sj.attention(
      q, k, v, sj.masks.causal(q.shape[1], block_size=128), impl=setup.impl)


def _seer(setup: Setup, density: float):
  """The whole-prefill mask of a random-weight gate: scores, top-k lists,
  BlockMask (`gate_mask`)."""
  gate = gate_lib.AttnGate(setup.heads, setup.kv_heads, setup.head_dim,
                           block_size=setup.block, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(gate)

  def mask(q, k):
    scores = nnx.merge(graphdef, state)(q, k)
    return gate_lib.gate_mask(scores, block_size=setup.block,
                              q_len=q.shape[1], density=density,
                              last_dense=2)

  return mask


def _minference(setup: Setup, pattern):
  return lambda q, k: minference.minference_mask(q, k, pattern,
                                                 block_size=setup.block)


def _forward_lists(mask):
  """What a prefill reads of the mask (the transposed lists are dK/dV's:
  a jitted forward never computes them)."""
  return (mask.full_counts, mask.full_idx, mask.partial_counts,
          mask.partial_idx)


def _time(fn, args, setup):
  return benchmark.median_ms(jax.jit(fn), args, setup.warmup, setup.repeats)


def run(*, lengths: Sequence[int], seer_densities: Sequence[float] = (0.1,),
        minference_pattern=minference.VerticalSlash(1000, 6096),
        probs_lengths: Sequence[int] = (), setup: Setup = Setup(),
        log=print) -> List[Dict]:
  """Times every case at every length; one dict per measurement.

  "ms" is the whole prefill attention (estimate, mask, attention);
  "ms_attention_only" the attention with the mask already built (one
  compile shared by all cases of a length: traced masks have equal shapes).
  """
  rows = []

  def record(row):
    rows.append(row)
    log(format_row(row))

  dtype = jnp.dtype(setup.dtype)
  attention_only = jax.jit(lambda q, k, v, mask: sj.attention(
      q, k, v, mask, impl=setup.impl))
  for seq in lengths:
    q, k, v, _ = benchmark.random_inputs(setup.batch, seq, setup.heads,
                                         setup.kv_heads, setup.head_dim,
                                         dtype)
    base = dict(seq=seq, heads=setup.heads, kv_heads=setup.kv_heads,
                head_dim=setup.head_dim, block=setup.block)
    try:
      dense_ms = _time(_dense(setup), (q, k, v), setup)
      record(dict(base, case="dense_cudnn" if jax.default_backend() == "gpu"
                  else "dense_xla", ms=dense_ms, density=1.0))
    except Exception as e:  # pylint: disable=broad-except
      record(dict(base, case="dense", error=_err(e)))
      continue
    cases = [(f"seer@{d:g}", _seer(setup, d)) for d in seer_densities]
    cases.append(("minference:" + minference.pattern_spec(
        minference_pattern), _minference(setup, minference_pattern)))
    for name, mask_fn in cases:
      try:
        @jax.jit
        def mask_and_density(q, k, mask_fn=mask_fn):
          mask = mask_fn(q, k)
          return mask, block_lists.causal_density(mask).mean()

        def total(q, k, v, mask_fn=mask_fn):
          return sj.attention(q, k, v, mask_fn(q, k), impl=setup.impl)

        mask, kept = mask_and_density(q, k)
        row = dict(base, case=name, density=float(kept),
                   width=int(mask.full_idx.shape[-1]),
                   ms=_time(total, (q, k, v), setup),
                   ms_mask=_time(lambda q, k, f=mask_fn: _forward_lists(
                       f(q, k)), (q, k), setup),
                   ms_attention_only=benchmark.median_ms(
                       attention_only, (q, k, v, mask), setup.warmup,
                       setup.repeats))
        row["speedup_vs_dense"] = dense_ms / row["ms"]
        row["attention_speedup_vs_dense"] = dense_ms / row[
            "ms_attention_only"]
        record(row)
        del mask
      except Exception as e:  # pylint: disable=broad-except
        record(dict(base, case=name, error=_err(e)))
    if seq in probs_lengths:
      try:
        ms = _time(lambda q, k: sj.learned.block_attention_probs(
            q, k, block_size=setup.block), (q, k), setup)
        record(dict(base, case="block_attention_probs", ms=ms,
                    ratio_to_dense=ms / dense_ms))
      except Exception as e:  # pylint: disable=broad-except
        record(dict(base, case="block_attention_probs", error=_err(e)))
    del q, k, v
  return rows


def _err(e) -> str:
  return f"{type(e).__name__}: {str(e)[:300]}"


def format_row(r) -> str:
  if "error" in r:
    return f"{r['case']:34s} {r['seq']:7d} FAILED {r['error']}"
  extra = ""
  if "speedup_vs_dense" in r:
    extra = f" x{r['speedup_vs_dense']:5.2f} vs dense"
  if "ms_attention_only" in r:
    extra += (f" (mask {r['ms_mask']:.2f} ms, attention alone "
              f"{r['ms_attention_only']:.2f} ms)")
  if "ratio_to_dense" in r:
    extra = f" {r['ratio_to_dense']:.2f}x the dense forward"
  dens = f"density {r['density']:.3f}" if "density" in r else ""
  return f"{r['case']:34s} {r['seq']:7d} {r['ms']:9.2f} ms {dens}{extra}"


def table(rows) -> str:
  """Markdown table of the rows."""
  out = ["| case | length | kept density | prefill ms | speed-up vs dense | "
         "mask ms | attention alone ms | its speed-up |",
         "|---|---|---|---|---|---|---|---|"]
  nan = float("nan")
  for r in rows:
    if "error" in r:
      out.append(f"| {r['case']} | {r['seq']} | failed: {r['error'][:60]} "
                 "| | | | | |")
      continue
    if "ratio_to_dense" in r:
      out.append(f"| {r['case']} | {r['seq']} | | {r['ms']:.2f} | "
                 f"({r['ratio_to_dense']:.2f}x the dense forward) | | | |")
      continue
    out.append(
        f"| {r['case']} | {r['seq']} | {r.get('density', nan):.3f} "
        f"| {r['ms']:.2f} | {r.get('speedup_vs_dense', nan):.2f} | "
        f"{r.get('ms_mask', nan):.2f} | "
        f"{r.get('ms_attention_only', nan):.2f} | "
        f"{r.get('attention_speedup_vs_dense', nan):.2f} |")
  return "\n".join(out)


def plot(rows, path: str) -> str:
  """Speed-up over dense vs length, one line per case."""
  from sparsejax import plotting  # pylint: disable=g-import-not-at-top
  plt = plotting.plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  series = {}
  for r in rows:
    if "speedup_vs_dense" in r:
      series.setdefault(r["case"], []).append((r["seq"],
                                               r["speedup_vs_dense"]))
  for name, pts in sorted(series.items()):
    pts.sort()
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=name)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("sequence length")
  ax.set_ylabel("prefill speed-up vs dense (x)")
  device = jax.devices()[0].device_kind
  ax.set_title(f"learned/dynamic sparsity, one layer, {device}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def environment() -> dict:
  return dict(device=jax.devices()[0].device_kind,
              backend=jax.default_backend(), jax=jax.__version__,
              time=time.strftime("%Y-%m-%d %H:%M:%S"),
              numpy=np.__version__)
