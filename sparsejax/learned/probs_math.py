"""Per-block math of `block_attention_probs`, shared by the xla path and the
Pallas kernels (they run literally the same arithmetic on values).

The op walks each q block's visible kv blocks twice: the first walk finds
the row log-sum-exp (online max and sum, no P @ V), the second turns every
block's logits into probabilities exp(s - lse) and keeps the block maximum
and where it is. Logits are in the base-2 domain (`block_math.scores`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ProbsConfig:
  """Static arguments of one call on block-padded inputs."""
  block: int       # rows and columns per block
  q_len: int       # true lengths: masks and ranges use them
  kv_len: int
  causal: bool
  scale: float
  interpret: Any = False
  tuning: Any = None  # implementation-specific settings

  def walk(self, i, num_kv_blocks):
    """(n_unmasked, n_total): kv blocks [0, n_unmasked) of q block i need no
    element mask, [n_unmasked, n_total) do (the diagonal, a ragged tail)."""
    ragged = self.kv_len % self.block != 0
    n_total = (jnp.minimum(i + 1, num_kv_blocks) if self.causal
               else jnp.int32(num_kv_blocks))
    limit = num_kv_blocks - 1 if ragged else num_kv_blocks
    n_unmasked = jnp.minimum(i, limit) if self.causal else jnp.int32(limit)
    return n_unmasked, n_total


def visible(cfg: ProbsConfig, q_start, kv_start):
  """Element mask of one (q block, kv block) pair."""
  shape = (cfg.block, cfg.block)
  q_idx = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  kv_idx = kv_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  vis = kv_idx < cfg.kv_len
  if cfg.causal:
    vis = vis & (kv_idx <= q_idx)
  return vis


def lse_step(s, m_prev, l_prev, vis):
  """Online (max, sum of exp2) over one block of base-2 logits."""
  if vis is not None:
    s = jnp.where(vis, s, -jnp.inf)
  m_new = jnp.maximum(m_prev, s.max(-1))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  l_new = jnp.exp2(m_prev - m_safe) * l_prev + jnp.exp2(
      s - m_safe[:, None]).sum(-1)
  return m_new, l_new


def lse2(m, l):
  """Base-2 log-sum-exp; +inf for rows with nothing visible, so that
  exp2(s - lse2) is 0 there."""
  return jnp.where(l > 0.0, m + jnp.log2(jnp.where(l > 0.0, l, 1.0)),
                   jnp.inf)


def block_max(s, lse2_rows, vis, row_valid, keepdims=False):
  """(max, flat argmax) over one block of probabilities exp2(s - lse2).

  row_valid [bq] drops padded query rows. The argmax is the first maximum in
  row-major order, as an int32 offset r * block + c inside the block.
  keepdims returns (1, 1) arrays instead of scalars (TPU keeps values in
  vector registers).
  """
  p = jnp.exp2(s - lse2_rows[:, None])
  keep = row_valid[:, None]
  if vis is not None:
    keep = keep & vis
  p = jnp.where(keep, p, 0.0)
  mx = p.max(axis=1, keepdims=True).max(axis=0, keepdims=True)
  bq, bk = p.shape
  flat = (jax.lax.broadcasted_iota(jnp.int32, p.shape, 0) * bk
          + jax.lax.broadcasted_iota(jnp.int32, p.shape, 1))
  arg = jnp.where(p == mx, flat, bq * bk)
  arg = arg.min(axis=1, keepdims=True).min(axis=0, keepdims=True)
  if keepdims:
    return mx, arg
  return mx[0, 0], arg[0, 0]
