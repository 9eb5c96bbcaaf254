"""The custom_vjp shared by every block-sparse implementation.

The implementation interface (block-padded inputs):

  forward(q, k, v, lists, params, cfg) -> (out, lse)
  backward(q, k, v, out, lse, do, delta, lists, params, cfg)
      -> (dq, dk, dv, dparams)

  q [B, Lq_pad, H, D], k/v [B, Lk_pad, Hkv, D]; lse/delta [B, H, Lq_pad] f32.
  lists: the BlockMask arrays broadcast to [B, H, ...] (`broadcast_lists`);
    with segment ids also "seg_counts"/"seg_idx" (+ "_t": blocks full under
    the mask whose ids are mixed: check ids only) and "q_segments" [B,
    Lq_pad] / "kv_segments" [B, Lk_pad] int32 (padded with -1 / -2, which
    never match). The partial list then checks mask_fn AND the ids.
  params: the score mod's array leaves (float ones as f32), () without one.
  cfg: StaticConfig; cfg.score_mod is the mod's treedef, so a kernel
    rebuilds the mod over its param refs or arrays with
    `score_mods.rebuild(cfg.score_mod, params)`.
  dparams: one cotangent per param, in order (float params only; integer
    ones get float0 here).

This module wires them into jax.custom_vjp, so the residuals and the
delta = rowsum(o * do) - dlse convention are the same for all.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
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
  score_mod: Any = None  # the mod's treedef (jax.tree.structure), or None
  segments: bool = False  # lists carry seg_* lists and segment ids


def walked_lists(cfg: StaticConfig):
  """(list name, apply cfg.mask_fn, check segment ids) per list a kernel
  walks, in order: full blocks need nothing, partial ones the mask (and the
  ids), seg ones (full under the mask, mixed ids) only the ids."""
  out = [("full", False, False)]
  if cfg.mask_fn is not None:
    out.append(("partial", True, cfg.segments))
  if cfg.segments:
    out.append(("seg", False, True))
  return out


def _zeros_like_nondiff(x):
  return jnp.zeros(x.shape, jax.dtypes.float0)


def is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def make_vjp(forward: Callable, backward: Callable) -> Callable:
  """attention(q, k, v, lists, params, cfg) -> (out, lse), custom backward.

  Functions of the former signature (forward(q, k, v, lists, cfg), backward
  returning (dq, dk, dv)) still give attention(q, k, v, lists, cfg); that
  form takes no score mod (the Mosaic GPU kernel until it moves over).
  """
  if len(inspect.signature(forward).parameters) == 5:
    return _make_vjp_without_params(forward, backward)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
  def attention(q, k, v, lists, params, cfg):
    return forward(q, k, v, lists, params, cfg)

  def fwd(q, k, v, lists, params, cfg):
    out, lse = forward(q, k, v, lists, params, cfg)
    return (out, lse), (q, k, v, out, lse, lists, params)

  def bwd(cfg, res, cts):
    q, k, v, out, lse, lists, params = res
    do, dlse = cts
    # delta_i = sum_j p_ij dp_ij = rowsum(o * do) - dlse: [B, H, Lq]
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32),
                       do.astype(jnp.float32))
    delta = delta - jnp.where(jnp.isfinite(lse), dlse, 0.0)
    dq, dk, dv, dparams = backward(q, k, v, out, lse, do, delta, lists,
                                   params, cfg)
    dparams = tuple(
        d.astype(p.dtype).reshape(p.shape) if is_float(p)
        else _zeros_like_nondiff(p) for p, d in zip(params, dparams))
    return (dq, dk, dv, jax.tree.map(_zeros_like_nondiff, lists), dparams)

  attention.defvjp(fwd, bwd)
  return attention


def _make_vjp_without_params(forward: Callable, backward: Callable):
  attention = make_vjp(
      lambda q, k, v, lists, params, cfg: forward(q, k, v, lists, cfg),
      lambda q, k, v, out, lse, do, delta, lists, params, cfg: (
          *backward(q, k, v, out, lse, do, delta, lists, cfg), ()))
  return lambda q, k, v, lists, cfg: attention(q, k, v, lists, (), cfg)
