"""The custom_vjp shared by every block-sparse implementation.

An implementation supplies `forward(q, k, v, lists, cfg) -> (out, lse)` and
`backward(q, k, v, out, lse, do, delta, lists, cfg) -> (dq, dk, dv)` on
block-padded inputs; this module wires them into jax.custom_vjp, so the
residuals and the delta = rowsum(o * do) - dlse convention are the same for all.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class StaticConfig:
  """Hashable, static arguments of one attention call (padded geometry)."""
  block_q: int
  block_kv: int
  q_len: int      # true (unpadded) lengths: masks and ranges use them
  kv_len: int
  mask_fn: Any
  scale: float
  soft_cap: Optional[float]
  interpret: Any = False
  tuning: Any = None  # implementation-specific block/warp settings


def make_vjp(forward: Callable, backward: Callable) -> Callable:
  """attention(q, k, v, lists, cfg) -> (out, lse) with a custom backward."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
  def attention(q, k, v, lists, cfg):
    return forward(q, k, v, lists, cfg)

  def fwd(q, k, v, lists, cfg):
    out, lse = forward(q, k, v, lists, cfg)
    return (out, lse), (q, k, v, out, lse, lists)

  def bwd(cfg, res, cts):
    q, k, v, out, lse, lists = res
    do, dlse = cts
    # delta_i = sum_j p_ij dp_ij = rowsum(o * do) - dlse: [B, H, Lq]
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32),
                       do.astype(jnp.float32))
    delta = delta - jnp.where(jnp.isfinite(lse), dlse, 0.0)
    dq, dk, dv = backward(q, k, v, out, lse, do, delta, lists, cfg)
    zero_lists = jax.tree.map(
        lambda x: jnp.zeros(x.shape, jax.dtypes.float0), lists)
    return dq, dk, dv, zero_lists

  attention.defvjp(fwd, bwd)
  return attention
