"""impl="xla" of `block_attention_probs`: blockwise jnp, O(L) memory.

A vmapped loop per (batch, head, q block) walks the visible kv blocks twice
(`probs_math`): the row lse first, then each block's maximum probability.
Nothing of size q_len x kv_len exists; the readable twin of the kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.block_sparse import block_math
from sparsejax.learned import probs_math


def _row(i, q_blk, k_all, cfg, nk):
  bs = cfg.block
  n_unmasked, n_total = cfg.walk(i, nk)
  k_blk = lambda kb: jax.lax.dynamic_slice_in_dim(k_all, kb * bs, bs, 0)
  s_of = lambda kb: block_math.scores(q_blk, k_blk(kb), cfg.scale, None)
  vis_of = lambda kb: probs_math.visible(cfg, i * bs, kb * bs)

  carry = (jnp.full((bs,), -jnp.inf, jnp.float32), jnp.zeros((bs,),
                                                             jnp.float32))
  carry = jax.lax.fori_loop(
      0, n_unmasked, lambda kb, c: probs_math.lse_step(s_of(kb), *c, None),
      carry)
  carry = jax.lax.fori_loop(
      n_unmasked, n_total,
      lambda kb, c: probs_math.lse_step(s_of(kb), *c, vis_of(kb)), carry)
  lse2 = probs_math.lse2(*carry)
  row_valid = i * bs + jnp.arange(bs) < cfg.q_len

  def body(kb, c, masked):
    mx, arg = probs_math.block_max(s_of(kb), lse2,
                                   vis_of(kb) if masked else None, row_valid)
    return c[0].at[kb].set(mx), c[1].at[kb].set(arg)

  out = (jnp.zeros((nk,), jnp.float32), jnp.zeros((nk,), jnp.int32))
  out = jax.lax.fori_loop(0, n_unmasked,
                          lambda kb, c: body(kb, c, False), out)
  return jax.lax.fori_loop(n_unmasked, n_total,
                           lambda kb, c: body(kb, c, True), out)


def forward(q, k, cfg: probs_math.ProbsConfig):
  """(max probs f32, argmax int32), both [B, H, nq, nk], on padded q, k."""
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  bs = cfg.block
  nq, nk = lq // bs, lk // bs
  qb = jnp.swapaxes(q, 1, 2).reshape(b, h, nq, bs, d)
  kh = jnp.repeat(jnp.swapaxes(k, 1, 2), h // hkv, axis=1)

  f = lambda i, q_blk, k_all: _row(i, q_blk, k_all, cfg, nk)
  g = jax.vmap(f, in_axes=(0, 0, None))  # q blocks
  g = jax.vmap(g, in_axes=(None, 0, 0))  # heads
  g = jax.vmap(g, in_axes=(None, 0, 0))  # batch
  return g(jnp.arange(nq), qb, kh)
