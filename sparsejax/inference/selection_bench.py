"""Decode timing for the paged cache and the selection methods.

One new token per sequence against caches of `length` tokens, random
contents (the work does not depend on them; Quest's page bounds and Double
Sparsity's labels are random too, so the selections are arbitrary but of
the budgeted size). Contenders:

  cudnn           jax.nn.dot_product_attention over the dense [B, L, Hkv, D]
  paged_dense     the split-KV paged kernel over every page (tuned at the
                  first length over `tunings`, the best kept)
  quest           page bounds + top-k pages + the kernel over them
  double_sparsity label scores + top-k tokens + the kernel's token view
  tidal_select    a TidalDecode selection layer: full attention and scores
                  in one kernel pass, then top-k
  tidal_reuse_k   a TidalDecode sparse layer over k reused positions
  moa             MoA's compacted per-head cache with a given plan

plus, for the selection methods, the selection alone ("..._select") and the
attention over precomputed lists ("..._attend"). Timing is
`bench.pipelined_us` (compile, warm-up, `inner` calls back to back and one
sync, median of `repeats`), the convention of benchmarks/decode/. Bytes read
per step count K/V and metadata only (not q, lists or outputs).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.inference import bench
from sparsejax.inference import double_sparsity
from sparsejax.inference import moa
from sparsejax.inference import quest
from sparsejax.inference import tidal
from sparsejax.inference.paged_cache import PagedKVCache, token_view
from sparsejax.inference.paged_decode import paged_decode_attention

# Contender names, for --include (prefix match).
NAMES = ("cudnn", "dense_xla", "paged_dense", "quest", "double_sparsity",
         "tidal", "moa")


@dataclasses.dataclass(frozen=True)
class Setup:
  batch: int = 8
  heads: int = 32
  kv_heads: int = 8
  head_dim: int = 128
  dtype: str = "bfloat16"
  page_size: int = 16
  quest_budget: int = 2048
  quest_pages: tuple = (16, 32)  # Quest's page 16, and 32 (half the bounds)
  ds_fraction: float = 1 / 16  # tokens and channels
  tidal_budgets: tuple = (128, 2048)
  # MoA plan: span fraction beta per kv head (alpha 0), mean 0.117.
  moa_betas: tuple = (1 / 32, 1 / 32, 1 / 16, 1 / 16, 1 / 8, 1 / 8, 1 / 4,
                      1 / 4)
  impl: str = "pallas_triton"
  interpret: bool = False
  dense_ref: str = "cudnn"  # or "dense_xla" (CPU): jax.nn over a dense cache
  # Llama-like schedule for TidalDecode's per-layer average.
  num_layers: int = 32
  dense_layers: int = 2
  selection_layers: int = 2

  @property
  def jdtype(self):
    return jnp.dtype(self.dtype)

  @property
  def item(self):
    return self.jdtype.itemsize


def random_cache(s: Setup, length: int, key, *, page_bounds=False,
                 channels=None) -> PagedKVCache:
  """A full cache (every sequence at `length`) with random pages in random
  pool order."""
  cache = jax.eval_shape(lambda: PagedKVCache.create(
      s.batch, length, s.kv_heads, s.head_dim, s.jdtype,
      page_size=s.page_size, page_bounds=page_bounds, channels=channels))
  ks = jax.random.split(key, 6)
  rnd = lambda k, x: jax.random.normal(k, x.shape, x.dtype)
  npool = cache.k_pages.shape[1]
  table = jax.random.permutation(ks[2], npool).astype(jnp.int32).reshape(
      s.batch, -1)
  fields = dict(
      k_pages=rnd(ks[0], cache.k_pages), v_pages=rnd(ks[1], cache.v_pages),
      page_table=table, lengths=jnp.full((s.batch,), length, jnp.int32),
      free=jnp.zeros((npool,), jnp.int32), num_free=jnp.int32(0),
      overflowed=jnp.zeros((s.batch,), bool))
  if page_bounds:
    lo = rnd(ks[3], cache.page_min)
    fields.update(page_min=lo - 1.0, page_max=lo + 1.0)
  if channels is not None:
    fields.update(labels=rnd(ks[4], cache.labels),
                  channels=jnp.asarray(channels, jnp.int32))
  return PagedKVCache(**fields)


def random_moa_cache(s: Setup, length: int, key) -> moa.MoAKVCache:
  spans = moa.MoASpans(tuple(0.0 for _ in s.moa_betas), s.moa_betas)
  shape = jax.eval_shape(lambda: moa.MoAKVCache.create(
      s.batch, length, s.kv_heads, s.head_dim, s.jdtype, spans))
  k1, k2 = jax.random.split(key)
  return dataclasses.replace(
      shape, k=jax.random.normal(k1, shape.k.shape, s.jdtype),
      v=jax.random.normal(k2, shape.v.shape, s.jdtype),
      lengths=jnp.full((s.batch,), length, jnp.int32),
      overflowed=jnp.zeros((s.batch,), bool))


def _kv_bytes(s: Setup, tokens_per_head) -> int:
  """K and V bytes of `tokens_per_head` tokens per (sequence, kv head)."""
  return int(2 * s.batch * s.kv_heads * tokens_per_head * s.head_dim *
             s.item)


@dataclasses.dataclass
class Case:
  name: str
  fn: Callable
  args: tuple
  read_bytes: int
  selected_fraction: float  # of the dense tokens the attention reads
  extra: dict = dataclasses.field(default_factory=dict)


def _kw(s: Setup, tuning=None):
  return dict(impl=s.impl, interpret=s.interpret, tuning=tuning)


def cases(s: Setup, length: int, key, *, tuning=None,
          include: Optional[Sequence[str]] = None) -> List[Case]:
  """Every contender at one length, over one random cache (with Quest's
  page bounds and a label cache, which dense decode does not read)."""
  want = lambda name: include is None or any(name.startswith(i)
                                             for i in include)
  out = []
  dense_bytes = _kv_bytes(s, length)
  q = jax.random.normal(jax.random.fold_in(key, 1),
                        (s.batch, s.heads, s.head_dim), s.jdtype)
  kw = _kw(s, tuning)
  r = max(1, round(s.head_dim * s.ds_fraction))
  cache = random_cache(s, length, key, page_bounds=True,
                       channels=np.tile(np.arange(r), (s.kv_heads, 1)))
  if want(s.dense_ref):
    k, v = cache.dense_kv()
    impl = bench.DENSE_IMPLS[s.dense_ref]
    out.append(Case(s.dense_ref, jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(
            q[:, None], k, v, implementation=impl)[:, 0]),
                    (q, k, v), dense_bytes, 1.0))
  if want("paged_dense"):
    out.append(Case("paged_dense", jax.jit(
        lambda q, c: paged_decode_attention(q, c.k_pages, c.v_pages,
                                            c.dense_lists(), **kw)),
                    (q, cache), dense_bytes, 1.0))
  if want("quest"):
    for page in s.quest_pages:
      qc = cache if page == s.page_size else random_cache(
          dataclasses.replace(s, page_size=page), length, key,
          page_bounds=True)
      out += _quest_cases(s, length, q, qc, kw,
                          "quest" if page == s.page_size else f"quest_p{page}")
  if want("double_sparsity"):
    budget = math.ceil(length * s.ds_fraction)
    labels = s.batch * s.kv_heads * length * r * s.item
    out.append(Case("double_sparsity", jax.jit(
        lambda q, c: double_sparsity.ds_decode(
            q, c, token_budget=budget, **kw)), (q, cache),
                    labels + _kv_bytes(s, budget), budget / length,
                    dict(label_bytes=labels, channels=r, tokens=budget)))
    select = jax.jit(lambda q, c: double_sparsity.select_tokens(
        q, c.labels, c.channels, c.lengths, token_budget=budget))
    out.append(Case("double_sparsity_select", select, (q, cache), labels,
                    0.0))
    pos, counts = select(q, cache)
    out.append(Case("double_sparsity_attend", jax.jit(
        lambda q, c, p, n: paged_decode_attention(
            q, token_view(c.k_pages), token_view(c.v_pages),
            c.token_lists(p, n), **kw)), (q, cache, pos, counts),
                    _kv_bytes(s, budget), budget / length))
  if want("tidal"):
    for k_tok in s.tidal_budgets:
      sel = jax.jit(lambda q, c, k_tok=k_tok: tidal.tidal_select(
          q, c, token_budget=k_tok, **kw))
      scores_bytes = s.batch * s.kv_heads * length * 4
      out.append(Case(f"tidal_select_{k_tok}", sel, (q, cache),
                      dense_bytes + scores_bytes, 1.0))
      _, pos, cnt = sel(q, cache)
      out.append(Case(f"tidal_reuse_{k_tok}", jax.jit(
          lambda q, c, p, n: tidal.tidal_reuse(q, c, p, n, **kw)),
                      (q, cache, pos, cnt), _kv_bytes(s, k_tok),
                      k_tok / length))
  if want("moa"):
    mc = random_moa_cache(s, length, key)
    held = float(np.asarray(mc.held_tokens()).mean())
    out.append(Case("moa", jax.jit(lambda q, c: moa.moa_decode(q, c, **kw)),
                    (q, mc), _kv_bytes(s, held), held / length,
                    dict(capacity=mc.capacity,
                         mean_beta=float(np.mean(s.moa_betas)))))
  return out


def _quest_cases(s: Setup, length, q, cache, kw, name):
  """Quest end to end, its selection alone and the attention alone."""
  page, budget = cache.page_size, s.quest_budget
  meta = int(2 * s.batch * s.kv_heads * (length // page) * s.head_dim *
             s.item)
  full = Case(name, jax.jit(lambda q, c: quest.quest_decode(
      q, c, token_budget=budget, **kw)), (q, cache),
              meta + _kv_bytes(s, budget), budget / length,
              dict(metadata_bytes=meta, page_size=page))
  select = jax.jit(lambda q, c: quest.select_pages(
      q, c.page_min, c.page_max, c.lengths, page_size=page,
      token_budget=budget))
  logical, counts = select(q, cache)
  attend = jax.jit(lambda q, c, lg, n: paged_decode_attention(
      q, c.k_pages, c.v_pages, c.page_lists(lg, n), **kw))
  return [full, Case(f"{name}_select", select, (q, cache), meta, 0.0),
          Case(f"{name}_attend", attend, (q, cache, logical, counts),
               _kv_bytes(s, budget), budget / length)]


def time_case(case: Case, *, warmup=3, repeats=20, inner=10) -> dict:
  t0 = time.perf_counter()
  us = bench.pipelined_us(case.fn, case.args, warmup, repeats, inner)
  return dict(name=case.name, us_per_step=us, read_bytes=case.read_bytes,
              read_tb_per_s=case.read_bytes / us * 1e-6,
              selected_fraction=case.selected_fraction,
              wall_s=time.perf_counter() - t0, **case.extra)


def tune_dense(s: Setup, length: int, key, tunings, *, log=print, **tk):
  """Times paged_dense under each TuningConfig; rows, best first."""
  rows = []
  for t in tunings:
    desc = dataclasses.asdict(t) if t is not None else None
    try:
      (case,) = cases(s, length, key, tuning=t, include=["paged_dense"])
      row = time_case(case, **tk)
    except Exception as e:  # pylint: disable=broad-except
      row = dict(name="paged_dense",
                 error=f"{type(e).__name__}: {str(e)[:200]}")
    row.update(tuning=desc, tuning_index=len(rows), length=length)
    log(row)
    rows.append(row)
  return sorted(rows, key=lambda r: r.get("us_per_step", float("inf")))


def run(s: Setup, lengths: Sequence[int], *, tunings=(None,),
        include=None, log=print, check=True, **tk) -> Dict:
  """{'rows': [...], 'tuning': [...]} over lengths; paged_dense is tuned at
  the first length and every kernel then runs with the best tuning."""
  key = jax.random.key(0)
  tune_rows = []
  best = None
  if len(tunings) > 1:
    tune_rows = tune_dense(s, lengths[0], key, tunings, log=log, **tk)
    ok = [r for r in tune_rows if "us_per_step" in r]
    best = tunings[ok[0]["tuning_index"]] if ok else None
  rows = []
  for length in lengths:
    got = {}
    try:
      built = cases(s, length, jax.random.fold_in(key, length), tuning=best,
                    include=include)
    except Exception as e:  # pylint: disable=broad-except
      log(f"length {length}: building the cases FAILED {e}")
      continue
    for case in built:
      try:
        row = dict(time_case(case, **tk), length=length)
        got[case.name] = case
        if check and case.name == "paged_dense" and s.dense_ref in got:
          ref = got[s.dense_ref]
          row["max_abs_err_vs_cudnn"] = float(jnp.abs(
              case.fn(*case.args).astype(jnp.float32) -
              ref.fn(*ref.args).astype(jnp.float32)).max())
      except Exception as e:  # pylint: disable=broad-except
        row = dict(name=case.name, length=length,
                   error=f"{type(e).__name__}: {str(e)[:300]}")
      log(row)
      rows.append(row)
    del built, got
  add_derived(rows, s)
  return dict(rows=rows, tuning=tune_rows, best_tuning=(
      dataclasses.asdict(best) if best is not None else None))


def add_derived(rows: List[dict], s: Setup) -> None:
  """Speed-ups vs dense and TidalDecode's per-layer average (Llama-like
  schedule: dense layers full, selection layers select, the rest reuse)."""
  for length in {r["length"] for r in rows}:
    at = {r["name"]: r for r in rows if r["length"] == length and
          "us_per_step" in r}
    dense = [at[n]["us_per_step"] for n in (s.dense_ref, "paged_dense")
             if n in at]
    for k_tok in s.tidal_budgets:
      sel, reuse = at.get(f"tidal_select_{k_tok}"), at.get(
          f"tidal_reuse_{k_tok}")
      if sel and reuse and "paged_dense" in at:
        n_reuse = s.num_layers - s.dense_layers - s.selection_layers
        avg = (s.dense_layers * at["paged_dense"]["us_per_step"] +
               s.selection_layers * sel["us_per_step"] +
               n_reuse * reuse["us_per_step"]) / s.num_layers
        row = dict(name=f"tidal_{k_tok}_layer_avg", length=length,
                   us_per_step=avg, derived=True,
                   schedule=f"{s.dense_layers} dense, {s.selection_layers} "
                            f"selection, {n_reuse} reuse of {s.num_layers}")
        rows.append(row)
        at[row["name"]] = row
    for r in at.values():
      if dense:
        r["speedup_vs_best_dense"] = min(dense) / r["us_per_step"]
      if "read_bytes" in r:
        r["read_fraction"] = r["read_bytes"] / _kv_bytes(s, length)


def format_table(rows: List[dict]) -> str:
  lines = [f"{'method':26s} {'length':>7s} {'us/step':>9s} {'read frac':>9s} "
           f"{'TB/s':>6s} {'vs dense':>8s}"]
  for r in rows:
    if "error" in r:
      lines.append(f"{r['name']:26s} {r['length']:7d} FAILED {r['error']}")
      continue
    sp = r.get("speedup_vs_best_dense")
    lines.append(
        f"{r['name']:26s} {r['length']:7d} {r['us_per_step']:9.1f} "
        f"{r.get('read_fraction', float('nan')):9.4f} "
        f"{r.get('read_tb_per_s', float('nan')):6.2f} "
        f"{'' if sp is None else f'{sp:.2f}x':>8s}")
  return "\n".join(lines)
