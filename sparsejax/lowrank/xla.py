"""impl="xla": Scatterbrain blockwise in plain jnp, O(L) memory.

The readable twin of the kernels: vmapped rows (forward, dQ) walk each q
block's full then partial kv lists, columns (dK/dV) the transposed lists,
with sb_math's block arithmetic; every row or column is first seeded with
its low-rank terms from the pre-pass states (vjp.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.block_sparse import block_math
from sparsejax.lowrank import sb_math
from sparsejax.lowrank import vjp


def _slice(x, block, size):
  return jax.lax.dynamic_slice_in_dim(x, block * size, size, axis=0)


def _lists(fc, fi, pc, pi, cfg):
  out = [(fc, fi, None)]
  if cfg.mask_fn is not None:
    out.append((pc, pi, cfg.mask_fn))
  return out


def _per_head(x, heads):
  """[B, L, Hx, .] -> [B, heads, L, .], repeating kv heads for GQA."""
  x = jnp.swapaxes(x, 1, 2)
  return jnp.repeat(x, heads // x.shape[1], axis=1)


def _state(s, i, causal):
  return jax.lax.dynamic_index_in_dim(s, i if causal else 0, 0, False)


def _forward_row(b, h, i, q_blk, qf_blk, pls2, k_all, v_all, kf_all, hs, zs,
                 fc, fi, pc, pi, cfg):
  bq, bk = cfg.block_q, cfg.block_kv
  ragged = cfg.kv_len % bk != 0
  causal = (dict(kf_c=_slice(kf_all, i, bq), v_c=_slice(v_all, i, bq))
            if cfg.causal else {})
  acc, lc = sb_math.seed_forward(qf_blk, _state(hs, i, cfg.causal),
                                 _state(zs, i, cfg.causal), **causal)
  carry = sb_math.init_carry(pls2, acc, lc)
  for count, idx, fn in _lists(fc, fi, pc, pi, cfg):

    def body(t, c, idx=idx, fn=fn):
      kb = idx[t]
      s = block_math.scores(q_blk, _slice(k_all, kb, bk), cfg.scale, None)
      u = sb_math.dot(qf_blk, _slice(kf_all, kb, bk), trans_b=True)
      vis = block_math.element_mask(fn, b, h, i * bq, kb * bk, bq, bk,
                                    cfg.kv_len, ragged)
      return sb_math.step(s, u, _slice(v_all, kb, bk), pls2, c, vis)

    carry = jax.lax.fori_loop(0, count, body, carry)
  return sb_math.finalize(pls2, carry, q_blk.dtype)


def forward(q, k, v, qf, kf, pls2, hs, zs, lists, cfg):
  """(out [B, Lq, H, D], lse [B, H, Lq], kappa [B, H, Lq])."""
  b, lq, h, d = q.shape
  nq = lq // cfg.block_q
  bq = cfg.block_q
  rows = lambda x: jnp.swapaxes(x, 1, 2).reshape(b, h, nq, bq, x.shape[-1])
  kh, vh, kfh = _per_head(k, h), _per_head(v, h), _per_head(kf, h)
  hsh, zsh = jnp.repeat(hs, h // hs.shape[1], 1), jnp.repeat(
      zs, h // zs.shape[1], 1)

  def f(bi, hi, i, qq, qqf, pp, fc, fi, pc, pi, ka, va, kfa, hss, zss):
    return _forward_row(bi, hi, i, qq, qqf, pp, ka, va, kfa, hss, zss, fc, fi,
                        pc, pi, cfg)

  row = (0,) * 7
  g = jax.vmap(f, in_axes=(None, None, 0) + row + (None,) * 5)
  g = jax.vmap(g, in_axes=(None, 0, None) + row + (0,) * 5)
  g = jax.vmap(g, in_axes=(0, None, None) + row + (0,) * 5)
  out, lse, kappa = g(
      jnp.arange(b), jnp.arange(h), jnp.arange(nq), rows(q), rows(qf),
      pls2.reshape(b, h, nq, bq), lists["full_counts"], lists["full_idx"],
      lists["partial_counts"], lists["partial_idx"], kh, vh, kfh, hsh, zsh)
  out = jnp.swapaxes(out.reshape(b, h, lq, d), 1, 2)
  return out, lse.reshape(b, h, lq), kappa.reshape(b, h, lq)


def _dq_row(b, h, i, q_blk, qf_blk, do_blk, lse, delta, beta, kd, k_all,
            v_all, kf_all, hs, zs, fc, fi, pc, pi, cfg):
  bq, bk = cfg.block_q, cfg.block_kv
  ragged = cfg.kv_len % bk != 0
  causal = (dict(kf_c=_slice(kf_all, i, bq), v_c=_slice(v_all, i, bq))
            if cfg.causal else {})
  dqf = sb_math.seed_dq(do_blk, beta, kd, _state(hs, i, cfg.causal),
                        _state(zs, i, cfg.causal), **causal)
  dq = jnp.zeros(q_blk.shape, jnp.float32)
  for count, idx, fn in _lists(fc, fi, pc, pi, cfg):

    def body(t, c, idx=idx, fn=fn):
      kb = idx[t]
      k_blk, kf_blk = _slice(k_all, kb, bk), _slice(kf_all, kb, bk)
      vis = block_math.element_mask(fn, b, h, i * bq, kb * bk, bq, bk,
                                    cfg.kv_len, ragged)
      ds, r, _ = sb_math.block_grads(q_blk, k_blk, _slice(v_all, kb, bk),
                                     do_blk, qf_blk, kf_blk, lse, delta, beta,
                                     kd, cfg.scale, vis)
      return (c[0] + sb_math.dot(ds.astype(k_blk.dtype), k_blk),
              c[1] - sb_math.dot(r.astype(kf_blk.dtype), kf_blk))

    dq, dqf = jax.lax.fori_loop(0, count, body, (dq, dqf))
  return dq, dqf


def _dkv_col(b, h, j, k_blk, v_blk, kf_blk, q_all, qf_all, do_all, lse_all,
             delta_all, beta_all, kd_all, gs, ys, fc, fi, pc, pi, cfg):
  bq, bk = cfg.block_q, cfg.block_kv
  ragged = cfg.kv_len % bk != 0
  causal = {}
  if cfg.causal:
    causal = dict(qf_c=_slice(qf_all, j, bk), do_c=_slice(do_all, j, bk),
                  beta_c=_slice(beta_all, j, bk), kd_c=_slice(kd_all, j, bk))
  dkf, dv = sb_math.seed_dkv(kf_blk, v_blk, _state(gs, j, cfg.causal),
                             _state(ys, j, cfg.causal), **causal)
  carry = (jnp.zeros(k_blk.shape, jnp.float32), dv, dkf)
  for count, idx, fn in _lists(fc, fi, pc, pi, cfg):

    def body(t, c, idx=idx, fn=fn):
      qb = idx[t]
      q_blk, qf_blk = _slice(q_all, qb, bq), _slice(qf_all, qb, bq)
      do_blk = _slice(do_all, qb, bq)
      vis = block_math.element_mask(fn, b, h, qb * bq, j * bk, bq, bk,
                                    cfg.kv_len, ragged)
      ds, r, pv = sb_math.block_grads(
          q_blk, k_blk, v_blk, do_blk, qf_blk, kf_blk,
          *(_slice(x, qb, bq) for x in (lse_all, delta_all, beta_all,
                                        kd_all)), cfg.scale, vis)
      return (c[0] + sb_math.dot(ds.astype(q_blk.dtype), q_blk, trans_a=True),
              c[1] + sb_math.dot(pv.astype(do_blk.dtype), do_blk,
                                 trans_a=True),
              c[2] - sb_math.dot(r.astype(qf_blk.dtype), qf_blk,
                                 trans_a=True))

    carry = jax.lax.fori_loop(0, count, body, carry)
  return carry  # f32: GQA sums over q heads before the cast


def backward(q, k, v, qf, kf, do, lse, delta, beta, kd, hs, zs, gs, ys,
             lists, cfg):
  """(dq, dk, dv, dq_hat, dk_hat) with dq/dk the softmax parts only."""
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  bq, bk = cfg.block_q, cfg.block_kv
  nq, nk = lq // bq, lk // bk
  do = do.astype(q.dtype)
  kh, vh, kfh = _per_head(k, h), _per_head(v, h), _per_head(kf, h)
  hsh = jnp.repeat(hs, h // hkv, 1)
  zsh = jnp.repeat(zs, h // hkv, 1)
  rows = lambda x: jnp.swapaxes(x, 1, 2).reshape(b, h, nq, bq, x.shape[-1])
  vec = lambda x: x.reshape(b, h, nq, bq)
  r0 = (0,) * 7
  lst = (0,) * 4

  def f(bi, hi, i, qq, qqf, dd, ll, de, be, kk, ka, va, kfa, hss, zss, fc,
        fi, pc, pi):
    return _dq_row(bi, hi, i, qq, qqf, dd, ll, de, be, kk, ka, va, kfa, hss,
                   zss, fc, fi, pc, pi, cfg)

  g = jax.vmap(f, in_axes=(None, None, 0) + r0 + (None,) * 5 + lst)
  g = jax.vmap(g, in_axes=(None, 0, None) + r0 + (0,) * 5 + lst)
  g = jax.vmap(g, in_axes=(0, None, None) + r0 + (0,) * 5 + lst)
  dq, dqf = g(jnp.arange(b), jnp.arange(h), jnp.arange(nq), rows(q),
              rows(qf), rows(do), vec(lse), vec(delta), vec(beta), vec(kd),
              kh, vh, kfh, hsh, zsh, lists["full_counts"], lists["full_idx"],
              lists["partial_counts"], lists["partial_idx"])
  dq = jnp.swapaxes(dq.reshape(b, h, lq, d), 1, 2)
  dqf = jnp.swapaxes(dqf.reshape(b, h, lq, -1), 1, 2)

  cols = lambda x: x.reshape(b, h, nk, bk, x.shape[-1])
  qh, qfh, doh = (jnp.swapaxes(x, 1, 2) for x in (q, qf, do))

  def fk(bi, hi, j, kk, vv, kkf, qa, qfa, da, la, dea, bea, kda, gss, yss,
         fc, fi, pc, pi):
    return _dkv_col(bi, hi, j, kk, vv, kkf, qa, qfa, da, la, dea, bea, kda,
                    gss, yss, fc, fi, pc, pi, cfg)

  c0 = (0,) * 3
  g = jax.vmap(fk, in_axes=(None, None, 0) + c0 + (None,) * 9 + lst)
  g = jax.vmap(g, in_axes=(None, 0, None) + c0 + (0,) * 9 + lst)
  g = jax.vmap(g, in_axes=(0, None, None) + c0 + (0,) * 9 + lst)
  dk, dv, dkf = g(jnp.arange(b), jnp.arange(h), jnp.arange(nk), cols(kh),
                  cols(vh), cols(kfh), qh, qfh, doh, lse, delta, beta, kd, gs,
                  ys, lists["full_counts_t"], lists["full_idx_t"],
                  lists["partial_counts_t"], lists["partial_idx_t"])
  group = h // hkv

  def per_kv_head(x):  # [B, H, nk, bk, .] -> [B, Lk, Hkv, .], summed (GQA)
    x = x.reshape(b, hkv, group, lk, x.shape[-1]).sum(2)
    return jnp.swapaxes(x, 1, 2)

  return (dq, per_kv_head(dk).astype(k.dtype), per_kv_head(dv).astype(
      v.dtype), dqf, per_kv_head(dkf))


attention = vjp.make_op(forward, backward)
