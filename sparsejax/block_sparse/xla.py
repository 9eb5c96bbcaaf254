"""impl="xla": blockwise attention over the BlockMask lists in plain jnp.

Runs on any backend with O(L) memory: a vmapped loop over each q block's kv
list (forward, dQ) and each kv block's q list (dK/dV), using the same block
math as the Pallas kernels. It is the fallback everywhere and the readable
twin of the kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.block_sparse import block_math
from sparsejax.block_sparse.vjp import make_vjp


def _slice(x, block, size):
  return jax.lax.dynamic_slice_in_dim(x, block * size, size, axis=0)


def _loop(count, body, carry):
  return jax.lax.fori_loop(0, count, body, carry)


def _lists(fc, fi, pc, pi, cfg):
  """(count, idx, mask_fn) for the full list, then the partial one if any."""
  out = [(fc, fi, None)]
  if cfg.mask_fn is not None:
    out.append((pc, pi, cfg.mask_fn))
  return out


def _forward_row(b, h, i, q_blk, k_all, v_all, fc, fi, pc, pi, cfg):
  bq, bk = cfg.block_q, cfg.block_kv
  ragged = cfg.kv_len % bk != 0
  carry = (jnp.full((bq,), -jnp.inf, jnp.float32),
           jnp.zeros((bq,), jnp.float32),
           jnp.zeros((bq, v_all.shape[-1]), jnp.float32))
  for count, idx, fn in _lists(fc, fi, pc, pi, cfg):

    def body(j, c, idx=idx, fn=fn):
      kb = idx[j]
      s = block_math.scores(q_blk, _slice(k_all, kb, bk), cfg.scale,
                            cfg.soft_cap)
      vis = block_math.element_mask(fn, b, h, i * bq, kb * bk, bq, bk,
                                    cfg.kv_len, ragged)
      return block_math.online_softmax_step(s, _slice(v_all, kb, bk), *c, vis)

    carry = _loop(count, body, carry)
  return block_math.finalize(*carry, q_blk.dtype)


def _per_head(x, heads):
  """[B, L, Hx, D] -> [B, heads, L, D], repeating kv heads for GQA."""
  x = jnp.swapaxes(x, 1, 2)
  return jnp.repeat(x, heads // x.shape[1], axis=1)


def forward(q, k, v, lists, cfg):
  b, lq, h, d = q.shape
  nq = lq // cfg.block_q
  qb = jnp.swapaxes(q, 1, 2).reshape(b, h, nq, cfg.block_q, d)
  kh, vh = _per_head(k, h), _per_head(v, h)

  def f(bi, hi, i, q_blk, fc, fi, pc, pi, k_all, v_all):
    return _forward_row(bi, hi, i, q_blk, k_all, v_all, fc, fi, pc, pi, cfg)

  # k/v vary over (b, h) but not over q blocks.
  g = jax.vmap(f, in_axes=(None, None, 0, 0, 0, 0, 0, 0, None, None))
  g = jax.vmap(g, in_axes=(None, 0, None, 0, 0, 0, 0, 0, 0, 0))
  g = jax.vmap(g, in_axes=(0, None, None, 0, 0, 0, 0, 0, 0, 0))
  out, lse = g(jnp.arange(b), jnp.arange(h), jnp.arange(nq), qb,
               lists["full_counts"], lists["full_idx"],
               lists["partial_counts"], lists["partial_idx"], kh, vh)
  out = jnp.swapaxes(out.reshape(b, h, lq, d), 1, 2)
  return out, lse.reshape(b, h, lq)


def _dq_row(b, h, i, q_blk, do_blk, lse_blk, delta_blk, k_all, v_all, fc, fi,
            pc, pi, cfg):
  bq, bk = cfg.block_q, cfg.block_kv
  ragged = cfg.kv_len % bk != 0
  dq = jnp.zeros(q_blk.shape, jnp.float32)
  for count, idx, fn in _lists(fc, fi, pc, pi, cfg):

    def body(j, acc, idx=idx, fn=fn):
      kb = idx[j]
      k_blk = _slice(k_all, kb, bk)
      vis = block_math.element_mask(fn, b, h, i * bq, kb * bk, bq, bk,
                                    cfg.kv_len, ragged)
      _, ds = block_math.probs_and_dscores(
          q_blk, k_blk, _slice(v_all, kb, bk), do_blk, lse_blk, delta_blk,
          cfg.scale, cfg.soft_cap, vis)
      return acc + jax.lax.dot(ds.astype(k_blk.dtype), k_blk,
                               precision=block_math.dot_precision(k_blk.dtype),
                               preferred_element_type=jnp.float32)

    dq = _loop(count, body, dq)
  return dq.astype(q_blk.dtype)


def _dkv_col(b, h, j, k_blk, v_blk, q_all, do_all, lse_all, delta_all, fc,
             fi, pc, pi, cfg):
  bq, bk = cfg.block_q, cfg.block_kv
  ragged = cfg.kv_len % bk != 0
  zeros = jnp.zeros(k_blk.shape, jnp.float32)
  carry = (zeros, jnp.zeros(v_blk.shape, jnp.float32))
  prec = block_math.dot_precision(k_blk.dtype)
  for count, idx, fn in _lists(fc, fi, pc, pi, cfg):

    def body(t, c, idx=idx, fn=fn):
      qb = idx[t]
      q_blk, do_blk = _slice(q_all, qb, bq), _slice(do_all, qb, bq)
      vis = block_math.element_mask(fn, b, h, qb * bq, j * bk, bq, bk,
                                    cfg.kv_len, ragged)
      p, ds = block_math.probs_and_dscores(
          q_blk, k_blk, v_blk, do_blk, _slice(lse_all, qb, bq),
          _slice(delta_all, qb, bq), cfg.scale, cfg.soft_cap, vis)
      dk = c[0] + jax.lax.dot(ds.T.astype(q_blk.dtype), q_blk, precision=prec,
                              preferred_element_type=jnp.float32)
      dv = c[1] + jax.lax.dot(p.T.astype(do_blk.dtype), do_blk,
                              precision=prec,
                              preferred_element_type=jnp.float32)
      return dk, dv

    carry = _loop(count, body, carry)
  return carry  # f32: GQA sums over q heads before the cast


def backward(q, k, v, out, lse, do, delta, lists, cfg):
  del out
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  nq, nk = lq // cfg.block_q, lk // cfg.block_kv
  qh, doh = jnp.swapaxes(q, 1, 2), jnp.swapaxes(do.astype(q.dtype), 1, 2)
  kh, vh = _per_head(k, h), _per_head(v, h)

  qb = qh.reshape(b, h, nq, cfg.block_q, d)
  dob = doh.reshape(b, h, nq, cfg.block_q, d)
  lseb = lse.reshape(b, h, nq, cfg.block_q)
  deltab = delta.reshape(b, h, nq, cfg.block_q)
  rows = (0, 0, 0, 0)
  f = lambda bi, hi, i, qq, dd, ll, de, ka, va, fc, fi, pc, pi: _dq_row(
      bi, hi, i, qq, dd, ll, de, ka, va, fc, fi, pc, pi, cfg)
  g = jax.vmap(f, in_axes=(None, None, 0) + rows + (None, None) + rows)
  g = jax.vmap(g, in_axes=(None, 0, None) + rows + (0, 0) + rows)
  g = jax.vmap(g, in_axes=(0, None, None) + rows + (0, 0) + rows)
  dq = g(jnp.arange(b), jnp.arange(h), jnp.arange(nq), qb, dob, lseb, deltab,
         kh, vh, lists["full_counts"], lists["full_idx"],
         lists["partial_counts"], lists["partial_idx"])
  dq = jnp.swapaxes(dq.reshape(b, h, lq, d), 1, 2)

  kb = kh.reshape(b, h, nk, cfg.block_kv, d)
  vb = vh.reshape(b, h, nk, cfg.block_kv, d)
  f = lambda bi, hi, j, kk, vv, qa, da, la, dea, fc, fi, pc, pi: _dkv_col(
      bi, hi, j, kk, vv, qa, da, la, dea, fc, fi, pc, pi, cfg)
  g = jax.vmap(f, in_axes=(None, None, 0, 0, 0) + (None,) * 4 + rows)
  g = jax.vmap(g, in_axes=(None, 0, None, 0, 0) + (0,) * 4 + rows)
  g = jax.vmap(g, in_axes=(0, None, None, 0, 0) + (0,) * 4 + rows)
  dk, dv = g(jnp.arange(b), jnp.arange(h), jnp.arange(nk), kb, vb, qh, doh,
             lse, delta, lists["full_counts_t"], lists["full_idx_t"],
             lists["partial_counts_t"], lists["partial_idx_t"])
  # Per-q-head gradients summed per kv head (GQA).
  dk = dk.reshape(b, hkv, h // hkv, lk, d).sum(2, dtype=jnp.float32)
  dv = dv.reshape(b, hkv, h // hkv, lk, d).sum(2, dtype=jnp.float32)
  return (dq, jnp.swapaxes(dk, 1, 2).astype(k.dtype),
          jnp.swapaxes(dv, 1, 2).astype(v.dtype))


attention = make_vjp(forward, backward)
