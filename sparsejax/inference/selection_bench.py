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
attention over precomputed lists ("..._attend"), and Quest at a second page
size: these "extra" rows run after the main ones. Every contender of a wave
(the tuning sweep, the main rows of every length, the extras) compiles
ahead of time in parallel (`aot.Compiler`); timing starts once the wave is
compiled, so no compile competes with a timed dispatch. Timing is
`bench.pipelined_us` (warm-up, `inner` calls back to back and one sync,
median of `repeats`), the convention of benchmarks/decode/. Bytes read per
step count K/V and metadata only (not q, lists or outputs). With a budget,
no case starts past it: a run cut short returns what it timed.
"""

from __future__ import annotations

import dataclasses
import functools
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
from sparsejax.training import aot

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
  if channels is not None:
    channels = tuple(map(tuple, np.asarray(channels).tolist()))
  return _random_cache(key, s, length, page_bounds, channels)


# One jit per cache shape: eager draws would compile op by op.
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _random_cache(key, s: Setup, length, page_bounds, channels):
  cache = PagedKVCache.create(
      s.batch, length, s.kv_heads, s.head_dim, s.jdtype,
      page_size=s.page_size, page_bounds=page_bounds, channels=channels)
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


@functools.partial(jax.jit, static_argnums=(0, 1))
def random_moa_cache(s: Setup, length: int, key) -> moa.MoAKVCache:
  spans = moa.MoASpans(tuple(0.0 for _ in s.moa_betas), s.moa_betas)
  shape = moa.MoAKVCache.create(s.batch, length, s.kv_heads, s.head_dim,
                                s.jdtype, spans)
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
  """One contender. `fn` is a jax.jit; `args` its arguments, or with
  `inputs` their shapes (the real ones come from an earlier case at timing
  time, e.g. a selection's lists)."""
  name: str
  fn: Callable
  args: tuple
  read_bytes: int
  selected_fraction: float  # of the dense tokens the attention reads
  extra: dict = dataclasses.field(default_factory=dict)
  inputs: Optional[Callable[[], tuple]] = None
  main: bool = True  # False: a breakdown row, timed after the main ones
  # out -> the array that must equal the dense reference's output
  dense_out: Optional[Callable] = None

  def call_args(self) -> tuple:
    return self.args if self.inputs is None else self.inputs()


def _after(case: Case, pick=lambda out: out):
  """inputs() of a case fed by `case`'s output (its compiled fn by then)."""
  return lambda: pick(case.fn(*case.call_args()))


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
  q = jax.jit(lambda key: jax.random.normal(
      jax.random.fold_in(key, 1), (s.batch, s.heads, s.head_dim),
      s.jdtype))(key)
  kw = _kw(s, tuning)
  r = max(1, round(s.head_dim * s.ds_fraction))
  cache = random_cache(s, length, key, page_bounds=True,
                       channels=np.tile(np.arange(r), (s.kv_heads, 1)))
  if want(s.dense_ref):
    k, v = jax.jit(lambda c: c.dense_kv())(cache)
    impl = bench.DENSE_IMPLS[s.dense_ref]
    out.append(Case(s.dense_ref, jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(
            q[:, None], k, v, implementation=impl)[:, 0]),
                    (q, k, v), dense_bytes, 1.0))
  if want("paged_dense"):
    out.append(Case("paged_dense", jax.jit(
        lambda q, c: paged_decode_attention(q, c.k_pages, c.v_pages,
                                            c.dense_lists(), **kw)),
                    (q, cache), dense_bytes, 1.0, dense_out=lambda o: o))
  if want("quest"):
    for page in s.quest_pages:
      qc = cache if page == s.page_size else random_cache(
          dataclasses.replace(s, page_size=page), length, key,
          page_bounds=True)
      out += _quest_cases(s, length, q, qc, kw,
                          "quest" if page == s.page_size else f"quest_p{page}",
                          main=page == s.page_size)
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
    sel = Case("double_sparsity_select", select, (q, cache), labels, 0.0,
               main=False)
    out.append(sel)
    out.append(Case("double_sparsity_attend", jax.jit(
        lambda q, c, p, n: paged_decode_attention(
            q, token_view(c.k_pages), token_view(c.v_pages),
            c.token_lists(p, n), **kw)),
                    (q, cache, *jax.eval_shape(select, q, cache)),
                    _kv_bytes(s, budget), budget / length,
                    inputs=_after(sel, lambda o: (q, cache, *o)),
                    main=False))
  if want("tidal"):
    for k_tok in s.tidal_budgets:
      sel = jax.jit(lambda q, c, k_tok=k_tok: tidal.tidal_select(
          q, c, token_budget=k_tok, **kw))
      scores_bytes = s.batch * s.kv_heads * length * 4
      select = Case(f"tidal_select_{k_tok}", sel, (q, cache),
                    dense_bytes + scores_bytes, 1.0,
                    dense_out=lambda o: o[0])
      out.append(select)
      _, pos, cnt = jax.eval_shape(sel, q, cache)
      out.append(Case(f"tidal_reuse_{k_tok}", jax.jit(
          lambda q, c, p, n: tidal.tidal_reuse(q, c, p, n, **kw)),
                      (q, cache, pos, cnt), _kv_bytes(s, k_tok),
                      k_tok / length,
                      inputs=_after(select, lambda o: (q, cache, *o[1:]))))
  if want("moa"):
    mc = random_moa_cache(s, length, key)
    held = float(np.asarray(jax.jit(lambda c: c.held_tokens())(mc)).mean())
    out.append(Case("moa", jax.jit(lambda q, c: moa.moa_decode(q, c, **kw)),
                    (q, mc), _kv_bytes(s, held), held / length,
                    dict(capacity=mc.capacity,
                         mean_beta=float(np.mean(s.moa_betas)))))
  return out


def _quest_cases(s: Setup, length, q, cache, kw, name, main):
  """Quest end to end, its selection alone and the attention alone."""
  page, budget = cache.page_size, s.quest_budget
  meta = int(2 * s.batch * s.kv_heads * (length // page) * s.head_dim *
             s.item)
  full = Case(name, jax.jit(lambda q, c: quest.quest_decode(
      q, c, token_budget=budget, **kw)), (q, cache),
              meta + _kv_bytes(s, budget), budget / length,
              dict(metadata_bytes=meta, page_size=page), main=main)
  select = jax.jit(lambda q, c: quest.select_pages(
      q, c.page_min, c.page_max, c.lengths, page_size=page,
      token_budget=budget))
  sel = Case(f"{name}_select", select, (q, cache), meta, 0.0, main=False)
  attend = jax.jit(lambda q, c, lg, n: paged_decode_attention(
      q, c.k_pages, c.v_pages, c.page_lists(lg, n), **kw))
  return [full, sel,
          Case(f"{name}_attend", attend,
               (q, cache, *jax.eval_shape(select, q, cache)),
               _kv_bytes(s, budget), budget / length,
               inputs=_after(sel, lambda o: (q, cache, *o)), main=False)]


def time_case(case: Case, *, warmup=3, repeats=20, inner=10) -> dict:
  t0 = time.perf_counter()
  us = bench.pipelined_us(case.fn, case.call_args(), warmup, repeats, inner)
  return dict(name=case.name, us_per_step=us, read_bytes=case.read_bytes,
              read_tb_per_s=case.read_bytes / us * 1e-6,
              selected_fraction=case.selected_fraction,
              wall_s=time.perf_counter() - t0, **case.extra)


class _Clock:
  """The run's budget: no case starts after `budget_s`."""

  def __init__(self, budget_s: Optional[float]):
    self.end = math.inf if budget_s is None else time.monotonic() + budget_s

  def out(self) -> bool:
    return time.monotonic() > self.end


def _time_wave(wave, compiler, clock, log, tk, *, dense=None):
  """Compiles the wave's (key, case) pairs in parallel, then times them in
  order; dense: {length: output of the dense reference} for the checks.
  Rows (with `key`'s length) as they come; errors are rows. Out of time,
  nothing more is compiled, waited for or timed (those rows say so)."""
  if not clock.out():
    for key, case in wave:
      compiler.submit(key, case.fn, *case.args)
  for key, case in wave:  # every compile done before the first timing
    if clock.out():
      break
    try:
      compiler.get(key)
    except Exception:  # pylint: disable=broad-except
      pass  # its row reports it
  rows = []
  for key, case in wave:
    length = key[0]
    if clock.out():
      row = dict(name=case.name, length=length, error=_SKIPPED)
    else:
      try:
        case.fn = compiler.get(key)
        row = dict(time_case(case, **tk), length=length)
        if dense is not None and case.name in _DENSE_REFS:
          dense[length] = case.fn(*case.call_args())
        elif dense and length in dense and case.dense_out is not None:
          got = case.dense_out(case.fn(*case.call_args()))
          row["max_abs_err_vs_dense"] = float(jnp.abs(
              got.astype(jnp.float32) -
              dense[length].astype(jnp.float32)).max())
      except Exception as e:  # pylint: disable=broad-except
        row = dict(name=case.name, length=length,
                   error=f"{type(e).__name__}: {str(e)[:300]}")
    log(row)
    rows.append(row)
  return rows


_DENSE_REFS = tuple(bench.DENSE_IMPLS)
_SKIPPED = "skipped: out of time"


def tune_dense(s: Setup, length: int, key, tunings, *, compiler=None,
               clock=None, log=print, **tk):
  """Times paged_dense under each TuningConfig; rows, best first."""
  compiler = compiler or aot.Compiler()
  wave, rows = [], []
  for i, t in enumerate(tunings):
    try:
      (case,) = cases(s, length, key, tuning=t, include=["paged_dense"])
      wave.append(((length, "tune", i), case))
    except Exception as e:  # pylint: disable=broad-except
      rows.append(dict(name="paged_dense", length=length, tuning_index=i,
                       error=f"{type(e).__name__}: {str(e)[:200]}"))
  timed = _time_wave(wave, compiler, clock or _Clock(None), lambda r: None,
                     tk)
  for (k, _), row in zip(wave, timed):
    row["tuning_index"] = k[2]
    rows.append(row)
  for row in rows:
    t = tunings[row["tuning_index"]]
    row["tuning"] = dataclasses.asdict(t) if t is not None else None
    log(row)
  return sorted(rows, key=lambda r: r.get("us_per_step", float("inf")))


def run(s: Setup, lengths: Sequence[int], *, tunings=(None,),
        include=None, log=print, check=True, budget_s=None, **tk) -> Dict:
  """{'rows': [...], 'tuning': [...]} over lengths; paged_dense is tuned at
  the first length and every kernel then runs with the best tuning. Waves:
  the tuning sweep, the main rows of every length, then the extras."""
  clock = _Clock(budget_s)
  compiler = aot.Compiler()
  # RBG: the contents do not matter, and its draws compile in a fraction of
  # threefry's time (seconds per cache shape on CPU).
  key = jax.random.key(0, impl="rbg")
  tune_rows = []
  best = None
  if len(tunings) > 1:
    tune_rows = tune_dense(s, lengths[0], key, tunings, compiler=compiler,
                           clock=clock, log=log, **tk)
    ok = [r for r in tune_rows if "us_per_step" in r]
    best = tunings[ok[0]["tuning_index"]] if ok else None
  built = []
  for length in lengths:
    try:
      built += [((length, c.name), c) for c in cases(
          s, length, jax.random.fold_in(key, length), tuning=best,
          include=include)]
    except Exception as e:  # pylint: disable=broad-except
      log(f"length {length}: building the cases FAILED {e}")
  dense = {} if check else None
  rows = []
  for main in (True, False):
    rows += _time_wave([kc for kc in built if kc[1].main == main], compiler,
                       clock, log, tk, dense=dense)
  cut_short = clock.out()
  if not cut_short:  # (else compiles may still run: the caller may exit)
    compiler.close()
  del built, dense
  add_derived(rows, s)
  return dict(rows=rows, tuning=tune_rows, best_tuning=(
      dataclasses.asdict(best) if best is not None else None),
              cut_short=cut_short)


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
