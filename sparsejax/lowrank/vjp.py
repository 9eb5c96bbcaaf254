"""The custom_vjp shared by every Scatterbrain implementation.

Around an implementation's fused block-sparse pass it runs, in XLA:

* the low-rank pre-pass: Performer features of q and k with their log
  scales (features.py), and the key states sum k_hat v^T, sum k_hat
  (states.kv_states: prefix sums per q block when causal);
* in the backward, the query states (states.q_states: suffix sums per kv
  block when causal) and the chain rule from the feature gradients to q
  and k: with t = phi o dL/dphi (= q_hat o dL/dq_hat, the scales cancel),
  dL/dx = sqrt(c) t W - c (sum_r t_r) x, from phi = exp(x' W^T - |x'|^2/2).

An implementation supplies, on padded inputs (see api.py):
  forward(q, k, v, qf, kf, pls2, hs, zs, lists, cfg) -> (out, lse, kappa)
  backward(q, k, v, qf, kf, do, lse, delta, beta, kd, hs, zs, gs, ys, lists,
           cfg) -> (dq, dk, dv, dqf, dkf)
The projection is fixed (the paper draws it once): its cotangent is zero.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sparsejax.lowrank import features as features_lib
from sparsejax.lowrank import sb_math
from sparsejax.lowrank import states


@dataclasses.dataclass(frozen=True)
class Config:
  """Static arguments of one call (padded geometry, true lengths)."""
  block_q: int
  block_kv: int
  q_len: int
  kv_len: int
  mask_fn: Any
  scale: float
  causal: bool
  num_features: int   # m (the projection's rows); features are padded to
  feature_pad: int    # this many columns (zeros) for the kernels
  interpret: Any = False
  tuning: Any = None


def prepass(q, k, v, projection, cfg: Config):
  """(qf, kf, pls2, hs, zs): features in q's dtype, zero-padded to
  cfg.feature_pad columns; pls2 [B, H, Lq] = log2 of the rows' feature
  scales; the key states."""
  h, hkv = q.shape[2], k.shape[2]
  qf, cq = features_lib.query_features(q, projection, cfg.scale)
  kf, ck = features_lib.key_features(k, projection, cfg.scale, cfg.kv_len)
  pad = [(0, 0)] * 3 + [(0, cfg.feature_pad - cfg.num_features)]
  qf = jnp.pad(qf, pad).astype(q.dtype)
  kf = jnp.pad(kf, pad).astype(k.dtype)
  pls2 = (cq + jnp.repeat(ck, h // hkv, 1)[:, :, None]) * sb_math.LOG2E
  hs, zs = states.kv_states(kf, v, chunk=cfg.block_q, causal=cfg.causal,
                            num_chunks=q.shape[1] // cfg.block_q)
  return qf, kf, pls2, hs, zs


def _chain(x, xf, dxf, projection, scale):
  """dL/dx of the features' dependence on x (x [B, L, Hx, D])."""
  m = projection.shape[0]
  t = xf[..., :m].astype(jnp.float32) * dxf[..., :m]
  w = projection.astype(jnp.float32) * math.sqrt(scale)
  if x.dtype != jnp.bfloat16:
    tw = jnp.einsum("blhm,md->blhd", t, w,
                    precision=jax.lax.Precision.HIGHEST)
  else:  # a native matmul, as the forward's features
    tw = jnp.einsum("blhm,md->blhd", t.astype(x.dtype), w.astype(x.dtype),
                    preferred_element_type=jnp.float32)
  return tw - scale * t.sum(-1, keepdims=True) * x.astype(jnp.float32)


def make_op(forward: Callable, backward: Callable) -> Callable:
  """op(q, k, v, projection, lists, cfg) -> out, with the custom backward."""

  def run(q, k, v, projection, lists, cfg):
    qf, kf, pls2, hs, zs = prepass(q, k, v, projection, cfg)
    out, lse, kappa = forward(q, k, v, qf, kf, pls2, hs, zs, lists, cfg)
    return out, (q, k, v, projection, qf, kf, pls2, hs, zs, out, lse, kappa,
                 lists)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
  def op(q, k, v, projection, lists, cfg):
    return run(q, k, v, projection, lists, cfg)[0]

  def bwd(cfg, res, do):
    q, k, v, projection, qf, kf, pls2, hs, zs, out, lse, kappa, lists = res
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32),
                       do.astype(jnp.float32))
    beta = jnp.exp2(pls2 - lse * sb_math.LOG2E)
    kd = kappa * delta
    gs, ys = states.q_states(qf, do, beta, kd, chunk=cfg.block_kv,
                             causal=cfg.causal,
                             num_chunks=k.shape[1] // cfg.block_kv)
    dq, dk, dv, dqf, dkf = backward(q, k, v, qf, kf, do, lse, delta, beta,
                                    kd, hs, zs, gs, ys, lists, cfg)
    dq = dq.astype(jnp.float32) + _chain(q, qf, dqf, projection, cfg.scale)
    dk = dk.astype(jnp.float32) + _chain(k, kf, dkf, projection, cfg.scale)
    zero_lists = jax.tree.map(
        lambda x: jnp.zeros(x.shape, jax.dtypes.float0), lists)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            jnp.zeros_like(projection), zero_lists)

  op.defvjp(run, bwd)
  return op
