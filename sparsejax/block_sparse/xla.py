"""impl="xla": blockwise attention over the BlockMask lists in plain jnp.

Runs on any backend with O(L) memory: a vmapped loop over each q block's kv
lists (forward, dQ) and each kv block's q lists (dK/dV), using the same block
math as the Pallas kernels. It is the fallback everywhere and the readable
twin of the kernels. A score mod is evaluated per block; its parameter
gradient is the per-block vjp (autodiff, so any mod works), summed over the
loop: dQ scans the q blocks (vmapped over batch and heads) and carries the
sums, so no per-row copy of the parameters is held.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.block_sparse import block_math
from sparsejax.block_sparse import score_mods
from sparsejax.block_sparse.vjp import make_vjp, walked_lists


def _slice(x, block, size):
  return jax.lax.dynamic_slice_in_dim(x, block * size, size, axis=0)


def _per_head(x, heads):
  """[B, L, Hx, D] -> [B, heads, L, D], repeating kv heads for GQA."""
  x = jnp.swapaxes(x, 1, 2)
  return jnp.repeat(x, heads // x.shape[1], axis=1)


def _row_lists(lists, cfg, suffix=""):
  """{name: (counts [B,H,n], idx [B,H,n,W])} of the walked lists."""
  return {name: (lists[f"{name}_counts{suffix}"], lists[f"{name}_idx{suffix}"])
          for name, _, _ in walked_lists(cfg)}


def _segments(lists, cfg, h):
  """Segment ids broadcast per head ([B, H, L]), or None."""
  if not cfg.segments:
    return None
  return tuple(jnp.broadcast_to(lists[n][:, None], (lists[n].shape[0], h,
                                                    lists[n].shape[1]))
               for n in ("q_segments", "kv_segments"))


def _vmap_rows(f, b, h, n, row_args, head_args):
  """f(b, h, i, row_args, head_args) over every (batch, head, row): row
  leaves are [B, H, n, ...], head leaves [B, H, ...]."""
  g = jax.vmap(f, in_axes=(None, None, 0, 0, None))
  g = jax.vmap(g, in_axes=(None, 0, None, 0, 0))
  g = jax.vmap(g, in_axes=(0, None, None, 0, 0))
  return g(jnp.arange(b), jnp.arange(h), jnp.arange(n), row_args, head_args)


def _block(cfg, mod, b, h, q_start, kv_start, bq, bk, use_fn, ids):
  """(element mask or None, mod coordinates or None) of one block pair."""
  ragged = cfg.kv_len % cfg.block_kv != 0
  vis = block_math.element_mask(cfg.mask_fn if use_fn else None, b, h,
                                q_start, kv_start, bq, bk, cfg.kv_len,
                                ragged, ids)
  at = (None if mod is None else
        block_math.coords(b, h, q_start, kv_start, bq, bk))
  return vis, at


# --- forward ----------------------------------------------------------------


def forward(q, k, v, lists, params, cfg):
  b, lq, h, d = q.shape
  bq, bk = cfg.block_q, cfg.block_kv
  nq = lq // bq
  mod = score_mods.rebuild(cfg.score_mod, params)
  segs = _segments(lists, cfg, h)
  rows = {"q": jnp.swapaxes(q, 1, 2).reshape(b, h, nq, bq, d),
          "lists": _row_lists(lists, cfg)}
  heads = {"k": _per_head(k, h), "v": _per_head(v, h)}
  if segs is not None:
    rows["q_seg"] = segs[0].reshape(b, h, nq, bq)
    heads["kv_seg"] = segs[1]

  def row(bi, hi, i, r, hd):
    carry = (jnp.full((bq,), -jnp.inf, jnp.float32),
             jnp.zeros((bq,), jnp.float32),
             jnp.zeros((bq, d), jnp.float32))
    for name, use_fn, use_ids in walked_lists(cfg):
      count, idx = r["lists"][name]

      def body(j, c, idx=idx, use_fn=use_fn, use_ids=use_ids):
        kb = idx[j]
        ids = (r["q_seg"], _slice(hd["kv_seg"], kb, bk)) if use_ids else None
        vis, at = _block(cfg, mod, bi, hi, i * bq, kb * bk, bq, bk, use_fn,
                         ids)
        s = block_math.scores(r["q"], _slice(hd["k"], kb, bk), cfg.scale,
                              cfg.soft_cap, mod, at)
        return block_math.online_softmax_step(s, _slice(hd["v"], kb, bk), *c,
                                              vis)

      carry = jax.lax.fori_loop(0, count, body, carry)
    return block_math.finalize(*carry, q.dtype)

  out, lse = _vmap_rows(row, b, h, nq, rows, heads)
  out = jnp.swapaxes(out.reshape(b, h, lq, d), 1, 2)
  return out, lse.reshape(b, h, lq)


# --- backward ---------------------------------------------------------------


def _param_vjp(cfg, params, fidx, s, at, g):
  """Cotangents of the float params from one block: vjp of the mod."""
  def mod_out(fparams):
    full = list(params)
    for j, x in zip(fidx, fparams):
      full[j] = x
    mod = score_mods.rebuild(cfg.score_mod, full)
    return jnp.broadcast_to(mod(s, *at), s.shape).astype(jnp.float32)

  _, vjp = jax.vjp(mod_out, tuple(params[j] for j in fidx))
  return vjp(g)[0]


def _dq(q, k, v, do, lse, delta, lists, params, cfg):
  """dQ [B, Lq, H, D] and the float params' cotangents.

  A scan over q blocks (each step vmapped over batch and heads) that adds
  each step's parameter cotangents into its carry.
  """
  b, lq, h, d = q.shape
  bq, bk = cfg.block_q, cfg.block_kv
  nq = lq // bq
  mod = score_mods.rebuild(cfg.score_mod, params)
  fidx = score_mods.float_positions(params)
  segs = _segments(lists, cfg, h)
  blocks = lambda x: jnp.moveaxis(x.reshape(b, h, nq, bq, *x.shape[3:]), 2, 0)
  rows = {"q": blocks(jnp.swapaxes(q, 1, 2)),
          "do": blocks(jnp.swapaxes(do.astype(q.dtype), 1, 2)),
          "lse": blocks(lse[..., None])[..., 0],
          "delta": blocks(delta[..., None])[..., 0],
          "lists": jax.tree.map(lambda x: jnp.moveaxis(x, 2, 0),
                                _row_lists(lists, cfg))}
  heads = {"k": _per_head(k, h), "v": _per_head(v, h)}
  if segs is not None:
    rows["q_seg"] = blocks(segs[0][..., None])[..., 0]
    heads["kv_seg"] = segs[1]
  prec = block_math.dot_precision(k.dtype)

  def row(bi, hi, i, r, hd):
    acc = (jnp.zeros((bq, d), jnp.float32),
           tuple(jnp.zeros(params[j].shape, jnp.float32) for j in fidx))
    for name, use_fn, use_ids in walked_lists(cfg):
      count, idx = r["lists"][name]

      def body(j, c, idx=idx, use_fn=use_fn, use_ids=use_ids):
        kb = idx[j]
        k_blk = _slice(hd["k"], kb, bk)
        ids = (r["q_seg"], _slice(hd["kv_seg"], kb, bk)) if use_ids else None
        vis, at = _block(cfg, mod, bi, hi, i * bq, kb * bk, bq, bk, use_fn,
                         ids)
        s_raw = jax.lax.dot_general(r["q"], k_blk, (((1,), (1,)), ((), ())),
                                    precision=prec,
                                    preferred_element_type=jnp.float32)
        _, g, ds = block_math.grads_from_raw(
            s_raw, _slice(hd["v"], kb, bk), r["do"], r["lse"], r["delta"],
            cfg.scale, cfg.soft_cap, vis, mod, at)
        dq = c[0] + jax.lax.dot(ds.astype(k_blk.dtype), k_blk,
                                precision=prec,
                                preferred_element_type=jnp.float32)
        dp = c[1]
        if fidx:
          dp = jax.tree.map(jnp.add, dp, _param_vjp(cfg, params, fidx,
                                                    s_raw * cfg.scale, at, g))
        return dq, dp

      acc = jax.lax.fori_loop(0, count, body, acc)
    return acc[0].astype(q.dtype), acc[1]

  def step(dparams, xs):
    i, r = xs
    f = lambda bi, hi, r, hd: row(bi, hi, i, r, hd)
    f = jax.vmap(f, in_axes=(None, 0, 0, 0))
    f = jax.vmap(f, in_axes=(0, None, 0, 0))
    dq_i, dp_i = f(jnp.arange(b), jnp.arange(h), r, heads)
    dparams = jax.tree.map(lambda a, x: a + x.sum((0, 1)), dparams, dp_i)
    return dparams, dq_i

  init = tuple(jnp.zeros(params[j].shape, jnp.float32) for j in fidx)
  dfloat, dq = jax.lax.scan(step, init, (jnp.arange(nq), rows))
  dq = jnp.moveaxis(dq, 0, 2).reshape(b, h, lq, d)
  dparams = [None] * len(params)
  for j, x in zip(fidx, dfloat):
    dparams[j] = x
  return jnp.swapaxes(dq, 1, 2), tuple(dparams)


def _dkv(q, k, v, do, lse, delta, lists, params, cfg):
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  bq, bk = cfg.block_q, cfg.block_kv
  nk = lk // bk
  mod = score_mods.rebuild(cfg.score_mod, params)
  segs = _segments(lists, cfg, h)
  kh, vh = _per_head(k, h), _per_head(v, h)
  rows = {"k": kh.reshape(b, h, nk, bk, d), "v": vh.reshape(b, h, nk, bk, d),
          "lists": _row_lists(lists, cfg, "_t")}
  heads = {"q": jnp.swapaxes(q, 1, 2),
           "do": jnp.swapaxes(do.astype(q.dtype), 1, 2),
           "lse": lse, "delta": delta}
  if segs is not None:
    heads["q_seg"] = segs[0]
    rows["kv_seg"] = segs[1].reshape(b, h, nk, bk)
  prec = block_math.dot_precision(k.dtype)

  def col(bi, hi, j, r, hd):
    carry = (jnp.zeros((bk, d), jnp.float32), jnp.zeros((bk, d), jnp.float32))
    for name, use_fn, use_ids in walked_lists(cfg):
      count, idx = r["lists"][name]

      def body(t, c, idx=idx, use_fn=use_fn, use_ids=use_ids):
        qb = idx[t]
        q_blk, do_blk = _slice(hd["q"], qb, bq), _slice(hd["do"], qb, bq)
        ids = (_slice(hd["q_seg"], qb, bq), r["kv_seg"]) if use_ids else None
        vis, at = _block(cfg, mod, bi, hi, qb * bq, j * bk, bq, bk, use_fn,
                         ids)
        p, _, ds = block_math.probs_and_grads(
            q_blk, r["k"], r["v"], do_blk, _slice(hd["lse"], qb, bq),
            _slice(hd["delta"], qb, bq), cfg.scale, cfg.soft_cap, vis, mod,
            at)
        dk = c[0] + jax.lax.dot(ds.T.astype(q_blk.dtype), q_blk,
                                precision=prec,
                                preferred_element_type=jnp.float32)
        dv = c[1] + jax.lax.dot(p.T.astype(do_blk.dtype), do_blk,
                                precision=prec,
                                preferred_element_type=jnp.float32)
        return dk, dv

      carry = jax.lax.fori_loop(0, count, body, carry)
    return carry  # f32: GQA sums over q heads before the cast

  dk, dv = _vmap_rows(col, b, h, nk, rows, heads)
  # Per-q-head gradients summed per kv head (GQA).
  dk = dk.reshape(b, hkv, h // hkv, lk, d).sum(2, dtype=jnp.float32)
  dv = dv.reshape(b, hkv, h // hkv, lk, d).sum(2, dtype=jnp.float32)
  return (jnp.swapaxes(dk, 1, 2).astype(k.dtype),
          jnp.swapaxes(dv, 1, 2).astype(v.dtype))


def backward(q, k, v, out, lse, do, delta, lists, params, cfg):
  del out
  dq, dparams = _dq(q, k, v, do, lse, delta, lists, params, cfg)
  dk, dv = _dkv(q, k, v, do, lse, delta, lists, params, cfg)
  return dq, dk, dv, dparams


attention = make_vjp(forward, backward)
