"""Context parallelism for block-sparse attention: a ring over `context`.

The sequence is split over the mesh axis `context` (n shards of whole
blocks). Queries stay on their shard; K/V (and their segment ids) travel a
ring (`jax.lax.ppermute`), so at step t shard r holds kv shard
s = (r - t) mod n. Each step runs the implementation's own kernel on the
lists of that (q shard, kv shard) pair only: the mask's rows of the local
q blocks, restricted to kv blocks of shard s and renumbered (built on
device from the row lists, no dense mask). A step whose pair lists nothing
(S2 and causal masks: every future shard, most far shards) skips its kernel
behind a `lax.cond`. The steps' (out, lse) merge by log-sum-exp.

Backward (custom_vjp): the ring runs again; each step recomputes its pair
with the implementation's vjp, fed the cotangents that the merge gives
(do_t = w_t do, dlse_t = w_t (rowsum(do (o_t - o)) + dlse), w_t =
exp(lse_t - lse)), which is the global softmax gradient restricted to the
pair. dK/dV accumulate in f32 buffers that travel with their K/V and take
one more ring step home. Memory per device stays O(L / n): no step's
residuals are kept.

The mask function and score mod see global positions: each (shard, step)
gets static offsets (offsets.py); causal-type masks only depend on the
difference, so a ring of n needs 2n - 1 distinct kernels, not n^2.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.block_sparse import score_mods
from sparsejax.block_sparse import segments as segments_lib
from sparsejax.block_sparse.block_mask import (BlockMask, broadcast_lists,
                                               compress_traced)
from sparsejax.parallel import offsets as offsets_lib
from sparsejax.parallel import shard

_ROWS = ("full_counts", "full_idx", "partial_counts", "partial_idx")
_Q, _LSE = "bsh.", "bhs"


@dataclasses.dataclass(frozen=True)
class Ring:
  """Static description of one ring attention call (hashable)."""
  plan: shard.Plan
  n: int
  block_q: int
  block_kv: int
  nq: int  # q / kv blocks per shard
  nk: int
  widths: Tuple[int, int, int, int]  # full, partial, full_t, partial_t
  segments: bool
  mask_fn: Any
  mask_fn_exact: bool
  # steps[t][i]: the StaticConfig of flat shard i at step t.
  steps: Tuple[Tuple[Any, ...], ...]
  nb: int  # batch / head shards that variants distinguish (1: none)
  nh: int

  def shard_index(self):
    r = jax.lax.axis_index(shard.CONTEXT_AXIS)
    bi = self.plan.index("b") if self.nb > 1 else 0
    hi = self.plan.index("h") if self.nh > 1 else 0
    return (bi * self.nh + hi) * self.n + r


def plan(q, k, mask, cfg, mesh) -> Optional[shard.Plan]:
  """The shard plan with a sequence axis, or None when the mesh has no
  `context` axis or it does not split both lengths into whole blocks."""
  n = shard.axis_size(mesh, shard.CONTEXT_AXIS)
  if n == 1:
    return None
  lq, lk = q.shape[1], k.shape[1]
  if (cfg.q_len != lq or cfg.kv_len != lk or lq % (n * cfg.block_q)
      or lk % (n * cfg.block_kv)):
    shard._warn_once(  # pylint: disable=protected-access
        ("ring", lq, lk, n), "sparsejax attention: q_len %d / kv_len %d do "
        "not split into %d shards of whole blocks (%d, %d): no context "
        "parallelism, replicated along 'context'", cfg.q_len, cfg.kv_len, n,
        cfg.block_q, cfg.block_kv)
    return None
  rows = {f: getattr(mask, f) for f in _ROWS}
  return shard.make_plan((q, k, rows), (_Q, _Q, "bhs"), mesh=mesh,
                         sequence=True, name="attention")


def _ring(p, q, k, mask, segs, params, cfg) -> Ring:
  b, lq, h, _ = q.shape
  n = p.count("s")
  nbs, nhs = p.count("b"), p.count("h")
  bl, hl = b // nbs, h // nhs
  ql, kl = lq // n, k.shape[1] // n
  nq, nk = ql // cfg.block_q, kl // cfg.block_kv
  used = offsets_lib.uses(cfg, params)
  nb = nbs if "b" in used else 1
  nh = nhs if "h" in used else 1
  work = _pair_work(mask, n, nq, nk)
  steps = []
  for t in range(n):
    variants = []
    for i in range(nb):
      for j in range(nh):
        for r in range(n):
          s = (r - t) % n
          variants.append(None if not work[r][s] else
                          offsets_lib.shifted_config(
                              cfg, params, (i * bl, j * hl, r * ql, s * kl),
                              global_bh=(b, h), local_bh=(bl, hl),
                              q_len=ql, kv_len=kl))
    steps.append(tuple(variants))
  widths = (min(mask.full_idx.shape[-1], nk),
            min(mask.partial_idx.shape[-1], nk),
            min(mask.full_idx_t.shape[-1], nq),
            min(mask.partial_idx_t.shape[-1], nq))
  return Ring(p, n, cfg.block_q, cfg.block_kv, nq, nk, widths,
              segs is not None, mask.mask_fn, mask.mask_fn_exact,
              tuple(steps), nb, nh)


def _pair_work(mask, n, nq, nk):
  """work[r][s]: whether q shard r lists any block of kv shard s; all True
  for a traced mask (the ring then decides on device)."""
  arrays = [getattr(mask, f) for f in _ROWS]
  if any(isinstance(x, jax.core.Tracer) for x in arrays):
    return [[True] * n for _ in range(n)]
  fc, fi, pc, pi = (np.asarray(x) for x in arrays)
  work = np.zeros((n, n), bool)
  for counts, idx in ((fc, fi), (pc, pi)):
    listed = np.arange(idx.shape[-1]) < counts[..., None]
    rows = np.broadcast_to((np.arange(counts.shape[-1]) // nq)[:, None],
                           idx.shape[2:])
    rows = np.broadcast_to(rows, idx.shape)
    np.logical_or.at(work, (rows[listed], idx[listed] // nk), True)
  return work.tolist()


def attention(fn, p: shard.Plan, q, k, v, mask, segs, params, cfg):
  """Ring attention of fn (the implementation) under plan p; returns the
  global (out, lse)."""
  ring = _ring(p, q, k, mask, segs, params, cfg)
  rows = {f: getattr(mask, f) for f in _ROWS}
  q_ids, kv_ids = (None, None) if segs is None else segs

  def local(q, k, v, rows, q_ids, kv_ids, params):
    return _ring_attention(fn, ring, q, k, v, rows, q_ids, kv_ids, params)

  return p.run(local, (q, k, v, rows, q_ids, kv_ids, params),
               (_Q, _Q, _Q, "bhs", "bs", "bs", ""), (_Q, _LSE))


# --- the lists of one (q shard, kv shard) pair ---------------------------------


def _member(counts, idx, start, n):
  """bool [B', H', rows, n]: the listed blocks in columns [start, start+n),
  renumbered from 0."""
  bb, hh, rr, w = idx.shape
  col = idx - start
  ok = (jnp.arange(w) < counts[..., None]) & (col >= 0) & (col < n)
  col = jnp.where(ok, col, n)  # n is out of range: dropped
  out = jnp.zeros((bb, hh, rr, n), bool)
  return out.at[jnp.arange(bb)[:, None, None, None],
                jnp.arange(hh)[None, :, None, None],
                jnp.arange(rr)[None, None, :, None], col].set(
                    True, mode="drop")


def _pair(ring: Ring, rows, s, q_ids, kv_ids, batch, heads):
  """(lists, has_work) of the local q blocks against kv shard s."""
  start = s * ring.nk
  full = _member(rows["full_counts"], rows["full_idx"], start, ring.nk)
  part = _member(rows["partial_counts"], rows["partial_idx"], start, ring.nk)
  wf, wp, wft, wpt = ring.widths
  fc, fi = compress_traced(full, wf)
  pc, pi = compress_traced(part, wp)
  fct, fit = compress_traced(jnp.swapaxes(full, -1, -2), wft)
  pct, pit = compress_traced(jnp.swapaxes(part, -1, -2), wpt)
  mask = BlockMask(fc, fi, pc, pi, fct, fit, pct, pit, ring.block_q,
                   ring.block_kv, ring.nq * ring.block_q,
                   ring.nk * ring.block_kv, ring.mask_fn, ring.mask_fn_exact)
  if not ring.segments:
    return broadcast_lists(mask, batch, heads), (fc.sum() + pc.sum()) > 0
  lists = segments_lib.refine(mask, q_ids, kv_ids, batch=batch, heads=heads)
  work = sum(lists[f"{x}_counts"].sum() for x in ("full", "partial", "seg"))
  return lists, work > 0


# --- the ring ------------------------------------------------------------------


def _rotate(xs, ring: Ring):
  """Each shard's arrays to the next shard of the ring (r -> r + 1)."""
  perm = [(i, (i + 1) % ring.n) for i in range(ring.n)]
  return jax.tree.map(
      lambda x: jax.lax.ppermute(x, shard.CONTEXT_AXIS, perm), xs)


def _rows_t(x):
  """[B, H, L] -> [B, L, H, 1] (lse-shaped rows against out)."""
  return jnp.swapaxes(x, 1, 2)[..., None]


def _merge(out, lse, out_t, lse_t):
  new = jnp.logaddexp(lse, lse_t)
  safe = jnp.where(jnp.isfinite(new), new, 0.0)
  a = jnp.where(lse == -jnp.inf, 0.0, jnp.exp(lse - safe))
  c = jnp.where(lse_t == -jnp.inf, 0.0, jnp.exp(lse_t - safe))
  return out * _rows_t(a) + out_t.astype(jnp.float32) * _rows_t(c), new


def _empty(q):
  b, l, h, _ = q.shape
  return jnp.zeros(q.shape, q.dtype), jnp.full((b, h, l), -jnp.inf,
                                               jnp.float32)


def _forward(fn, ring: Ring, q, k, v, rows, q_ids, kv_ids, params):
  b, _, h, _ = q.shape
  r = jax.lax.axis_index(shard.CONTEXT_AXIS)
  index = ring.shard_index()
  out = jnp.zeros(q.shape, jnp.float32)
  lse = _empty(q)[1]
  kv = (k, v, kv_ids)
  for t in range(ring.n):
    kc, vc, ic = kv
    lists, work = _pair(ring, rows, (r - t) % ring.n, q_ids, ic, b, h)
    call = lambda c, kc=kc, vc=vc, lists=lists: fn(q, kc, vc, lists, params,
                                                   c)
    if any(c is not None for c in ring.steps[t]):  # else: nothing listed
      out_t, lse_t = jax.lax.cond(
          work, lambda call=call, t=t: offsets_lib.switch(
              index, ring.steps[t],
              lambda c: _empty(q) if c is None else call(c)),
          lambda: _empty(q))
      out, lse = _merge(out, lse, out_t, lse_t)
    if t + 1 < ring.n:
      kv = _rotate(kv, ring)
  return out.astype(q.dtype), lse


def _float0(x):
  return jnp.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring_attention(fn, ring, q, k, v, rows, q_ids, kv_ids, params):
  return _forward(fn, ring, q, k, v, rows, q_ids, kv_ids, params)


def _ring_fwd(fn, ring, q, k, v, rows, q_ids, kv_ids, params):
  out, lse = _forward(fn, ring, q, k, v, rows, q_ids, kv_ids, params)
  return (out, lse), (q, k, v, rows, q_ids, kv_ids, params, out, lse)


def _step_grads(fn, q, k, v, lists, params, out, lse, do, dlse, cfg):
  """(dq, dk, dv, dparams) of one pair, f32: its vjp fed the merge's
  cotangents (module docstring)."""
  fidx = score_mods.float_positions(params)

  def f(q, k, v, fparams):
    full = list(params)
    for j, x in zip(fidx, fparams):
      full[j] = x
    return fn(q, k, v, lists, tuple(full), cfg)

  (out_t, lse_t), vjp = jax.vjp(f, q, k, v,
                                tuple(params[j] for j in fidx))
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  w = jnp.where(lse_t == -jnp.inf, 0.0, jnp.exp(lse_t - safe))
  do32 = do.astype(jnp.float32)
  do_t = (_rows_t(w) * do32).astype(out_t.dtype)
  dlse_t = w * (jnp.einsum("blhd,blhd->bhl", do32,
                           out_t.astype(jnp.float32) -
                           out.astype(jnp.float32)) + dlse)
  dq, dk, dv, dp = vjp((do_t, dlse_t))
  f32 = lambda x: x.astype(jnp.float32)
  return f32(dq), f32(dk), f32(dv), tuple(map(f32, dp))


def _ring_bwd(fn, ring, res, cts):
  q, k, v, rows, q_ids, kv_ids, params, out, lse = res
  do, dlse = cts
  dlse = jnp.where(jnp.isfinite(lse), dlse, 0.0)
  b, _, h, _ = q.shape
  r = jax.lax.axis_index(shard.CONTEXT_AXIS)
  index = ring.shard_index()
  fidx = score_mods.float_positions(params)
  zeros = lambda: (jnp.zeros(q.shape, jnp.float32),
                   jnp.zeros(k.shape, jnp.float32),
                   jnp.zeros(v.shape, jnp.float32),
                   tuple(jnp.zeros(params[j].shape, jnp.float32)
                         for j in fidx))
  dq, dk, dv, dparams = zeros()
  kv = (k, v, kv_ids)
  for t in range(ring.n):
    kc, vc, ic = kv
    lists, work = _pair(ring, rows, (r - t) % ring.n, q_ids, ic, b, h)
    call = lambda c, kc=kc, vc=vc, lists=lists: _step_grads(
        fn, q, kc, vc, lists, params, out, lse, do, dlse, c)
    if any(c is not None for c in ring.steps[t]):
      g = jax.lax.cond(
          work, lambda call=call, t=t: offsets_lib.switch(
              index, ring.steps[t],
              lambda c: zeros() if c is None else call(c)),
          zeros)
      dq = dq + g[0]
      dk, dv = dk + g[1], dv + g[2]
      dparams = jax.tree.map(jnp.add, dparams, g[3])
    # The gradient buffers travel with their K/V; the last step sends them
    # home.
    if t + 1 < ring.n:
      kv, (dk, dv) = _rotate((kv, (dk, dv)), ring)
    else:
      dk, dv = _rotate((dk, dv), ring)
  dfull = [None] * len(params)
  for j, x in zip(fidx, dparams):
    dfull[j] = x.astype(params[j].dtype)
  dfull = tuple(_float0(p) if d is None else d
                for p, d in zip(params, dfull))
  ids_ct = lambda x: None if x is None else _float0(x)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          jax.tree.map(_float0, rows), ids_ct(q_ids), ids_ct(kv_ids), dfull)


_ring_attention.defvjp(_ring_fwd, _ring_bwd)
