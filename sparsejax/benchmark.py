"""Attention benchmarking: cases, contenders, honest timing, FLOP counting.

Used by experiments/bench_attention.py; importable from a notebook.
Timing: compile + warm-up calls first, then `repeats` calls each synchronised
with block_until_ready; the median is reported. Inputs are random normal.
Useful FLOPs count only visible score entries: 4 * D * visible forward and
3.5x that forward+backward (the peers' convention).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

import sparsejax as sj
from sparsejax.block_sparse.block_mask import BlockMask

BWD_FLOP_FACTOR = 3.5


# --- cases: name -> mask builder(seq_len, heads) -----------------------------

CASES: Dict[str, Callable[..., BlockMask]] = {}


def register_case(name):
  def wrap(fn):
    CASES[name] = fn
    return fn
  return wrap


@register_case("dense_causal")
def _dense_causal(seq_len, heads, block=128, **_):
  del heads
  return sj.masks.causal(seq_len, block_size=block)


@register_case("sliding_window")
def _sliding(seq_len, heads, block=128, window=2048, **_):
  del heads
  return sj.masks.sliding_window(seq_len, window, block_size=block)


@register_case("s2")
def _s2(seq_len, heads, block=128, local_blocks=8, vert_stride=8, **_):
  return sj.masks.s2(seq_len, heads, block_size=block,
                     local_blocks=local_blocks, vert_stride=vert_stride)


def visible_entries(mask: BlockMask, batch: int, heads: int) -> int:
  """Exact count of visible (q, kv) entries over batch and heads.

  Full blocks count whole (clipped to the lengths); partial blocks are
  evaluated element by element, one list column at a time.
  """
  bq, bk = mask.block_q, mask.block_kv
  mb, mh = mask.batch_size, mask.num_heads
  q_rows = np.minimum(bq, mask.q_len - np.arange(mask.num_q_blocks) * bq)
  kv_cols = np.minimum(bk, mask.kv_len - np.arange(mask.num_kv_blocks) * bk)
  total = 0
  fc, fi = np.asarray(mask.full_counts), np.asarray(mask.full_idx)
  valid = np.arange(fi.shape[-1]) < fc[..., None]
  total += int((kv_cols[fi] * valid * q_rows[None, None, :, None]).sum())
  if mask.mask_fn is not None:
    pc, pi = np.asarray(mask.partial_counts), np.asarray(mask.partial_idx)
    qi = jnp.arange(bq)[:, None]
    ki = jnp.arange(bk)[None, :]

    @jax.jit
    def count(col):  # one list column for every (b, h, q block)
      b = jnp.arange(mb)[:, None, None]
      h = jnp.arange(mh)[None, :, None]
      i = jnp.arange(pi.shape[2])[None, None, :]
      kb = jnp.asarray(pi)[..., col]
      q = (i * bq)[..., None, None] + qi
      kv = (kb * bk)[..., None, None] + ki
      vis = mask.mask_fn(b[..., None, None], h[..., None, None], q, kv)
      vis = vis & (q < mask.q_len) & (kv < mask.kv_len)
      return jnp.where(col < jnp.asarray(pc), vis.sum((-1, -2)), 0).sum()

    total += sum(int(count(c)) for c in range(pi.shape[-1]))
  return total * (batch // mb) * (heads // mh)


# --- contenders ----------------------------------------------------------------


@dataclasses.dataclass
class Contender:
  name: str
  # make(case, mask, window) -> attention fn(q, k, v), or None if unsupported.
  make: Callable


def _sparsejax(impl, tuning=None):
  def make(case, mask, **_):
    del case
    return lambda q, k, v: sj.attention(q, k, v, mask, impl=impl,
                                        tuning=tuning)
  return make


def _cudnn(case, mask, window=2048, **_):
  del mask
  if case == "dense_causal":
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn")
  if case == "sliding_window":
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(window - 1, 0),
        implementation="cudnn")
  return None


def contenders(names: List[str], tuning=None) -> List[Contender]:
  table = {"cudnn": _cudnn}
  out = []
  for n in names:
    if n in table:
      out.append(Contender(n, table[n]))
    else:
      # --triton_tuning settings are the Triton kernel's; others use defaults.
      out.append(Contender(f"sparsejax:{n}", _sparsejax(
          n, tuning if n == "pallas_triton" else None)))
  return out


# --- timing ----------------------------------------------------------------------


def median_ms(fn, args, warmup: int, repeats: int, inner: int = 1) -> float:
  """Median over `repeats` of the time of `inner` calls (one device sync at
  the end) divided by `inner`, after compiling and `warmup` calls."""
  jax.block_until_ready(fn(*args))  # compile
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(inner)])
    times.append((time.perf_counter() - t0) * 1e3 / inner)
  return statistics.median(times)


def fwd_and_fwdbwd(attn):
  fwd = jax.jit(attn)

  @jax.jit
  def fwdbwd(q, k, v, do):
    _, vjp = jax.vjp(attn, q, k, v)
    return vjp(do)

  return fwd, fwdbwd


def random_inputs(batch, seq_len, heads, kv_heads, head_dim, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (batch, seq_len, heads, head_dim), dtype)
  k = jax.random.normal(ks[1], (batch, seq_len, kv_heads, head_dim), dtype)
  v = jax.random.normal(ks[2], k.shape, dtype)
  do = jax.random.normal(ks[3], q.shape, dtype)
  return q, k, v, do


def max_rel_error(got, want) -> float:
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def run_grid(*, lengths, cases, contenders: List[Contender], batch, heads,  # pylint: disable=redefined-outer-name
             kv_heads, head_dim, dtype, case_kw, warmup, repeats,
             max_bwd_len=1 << 30, check_below=8192, log=print) -> List[dict]:
  """Times every (length, case, contender); one row per measurement.

  At lengths <= check_below each contender's output is also compared with
  the dense f32 reference (relative L2 error, 'err_vs_reference').
  """
  rows = []
  for seq in lengths:
    q, k, v, do = random_inputs(batch, seq, heads, kv_heads, head_dim, dtype)
    baseline = {}
    for case in cases:
      mask = CASES[case](seq, heads, **case_kw)
      visible = visible_entries(mask, batch, heads)
      frac = visible / (batch * heads * seq * seq)
      ref = None
      if seq <= check_below:
        ref = jax.jit(lambda q, k, v, m=mask: sj.attention(
            q, k, v, m, impl="reference"))(q, k, v)
      for c in contenders:
        attn = c.make(case, mask, window=case_kw.get("window", 2048))
        if attn is None:
          continue
        fwd, fwdbwd = fwd_and_fwdbwd(attn)
        row = dict(case=case, impl=c.name, seq=seq, visible_fraction=frac)
        try:
          if ref is not None:
            row["err_vs_reference"] = max_rel_error(fwd(q, k, v), ref)
          for bwd in (False, True):
            if bwd and seq > max_bwd_len:
              continue
            args = (q, k, v, do) if bwd else (q, k, v)
            ms = median_ms(fwdbwd if bwd else fwd, args, warmup, repeats)
            flops = 4 * visible * head_dim * (BWD_FLOP_FACTOR if bwd else 1)
            r = dict(row, backward=bwd, ms=ms, useful_tflops=flops / ms / 1e9)
            if case == "dense_causal" and c.name == "cudnn":
              baseline[bwd] = ms
            if bwd in baseline:
              r["speedup_vs_dense_cudnn"] = baseline[bwd] / ms
            rows.append(r)
            log(_format_row(r))
        except Exception as e:  # pylint: disable=broad-except
          r = dict(row, error=f"{type(e).__name__}: {str(e)[:300]}")
          rows.append(r)
          log(f"{case:15s} {c.name:26s} {seq:7d} FAILED {r['error']}")
      del ref
  return rows


def _format_row(r) -> str:
  sp = r.get("speedup_vs_dense_cudnn")
  err = r.get("err_vs_reference")
  return (f"{r['case']:15s} {r['impl']:26s} {r['seq']:7d} "
          f"{'fwd+bwd' if r['backward'] else 'fwd':7s} {r['ms']:10.3f} ms "
          f"{r['useful_tflops']:7.1f} TFLOP/s "
          f"{'' if sp is None else f'x{sp:6.2f} vs dense cuDNN'} "
          f"{'' if err is None else f'err {err:.1e}'}")


def format_table(rows) -> str:
  head = (f"{'case':15s} {'impl':26s} {'seq':>7s} {'pass':7s} {'time':>13s} "
          f"{'useful':>15s} speed-up / error")
  return "\n".join([head] + [_format_row(r) for r in rows if "ms" in r] +
                   [f"{r['case']} {r['impl']} {r['seq']}: {r['error']}"
                    for r in rows if "error" in r])


def parse_tuning(text: str):
  """'a=1,b=2' -> the Triton kernel's TuningConfig (None for '')."""
  if not text:
    return None
  from pallas_kernels.gpu.block_sparse_attention import TuningConfig  # pylint: disable=g-import-not-at-top
  kw = {}
  for item in text.split(","):
    key, _, value = item.partition("=")
    kw[key.strip()] = int(value)
  return TuningConfig(**kw)


def tune(case, seq, configs, *, heads, head_dim, dtype, case_kw, warmup=2,
         repeats=5, log=print, impl="pallas_triton"):
  """Times `impl` over its TuningConfigs; returns rows sorted by fwd+bwd."""
  q, k, v, do = random_inputs(1, seq, heads, heads, head_dim, dtype)
  mask = CASES[case](seq, heads, **case_kw)
  rows = []
  for cfg in configs:
    fwd, fwdbwd = fwd_and_fwdbwd(_sparsejax(impl, cfg)(case, mask))
    row = {"tuning": dataclasses.asdict(cfg)}
    try:
      row["fwd_ms"] = median_ms(fwd, (q, k, v), warmup, repeats)
      row["fwdbwd_ms"] = median_ms(fwdbwd, (q, k, v, do), warmup, repeats)
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    log(row)
    rows.append(row)
  return sorted(rows, key=lambda r: r.get("fwdbwd_ms", float("inf")))
