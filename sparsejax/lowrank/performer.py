"""Performer attention (FAVOR+ softmax kernel), chunked: O(L) memory.

out_i = phi_i^T sum_{A(i)} phi_j v_j^T / max(phi_i . sum_{A(i)} phi_j, eps_i),
A(i) all keys, or j <= i when causal; `reference.performer_reference` is the
definition (eps_i as Scatterbrain's clamp, so an empty support reproduces
this op). Bidirectional: one state per kv head. Causal: exclusive prefix
states per chunk plus the masked quadratic term inside each chunk (the
chunked form of linear attention). Plain jnp; gradients by autodiff.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from sparsejax.lowrank import checks
from sparsejax.lowrank import features as features_lib
from sparsejax.lowrank import states
from sparsejax.lowrank.reference import TINY

_HI = jax.lax.Precision.HIGHEST


def performer_attention(q, k, v, projection, *, causal: bool = False,
                        scale: Optional[float] = None, chunk: int = 64):
  """Low-rank (Performer) attention alone.

  Args:
    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads,
      head_dim], heads % kv_heads == 0.
    projection: W [num_features, head_dim] (`orthogonal_gaussian_projection`).
    causal: query i sees keys j <= i (top-left aligned).
    scale: score scale, default head_dim ** -0.5.
    chunk: rows per chunk of the causal prefix sums.

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype (computed in f32, or f64).
  """
  checks.qkv(q, k, v, projection, allow_f64=True)
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"chunk must be a positive int, got {chunk!r}")
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  scale = float(d ** -0.5 if scale is None else scale)
  qf, _ = features_lib.query_features(q, projection, scale)
  kf, _ = features_lib.key_features(k, projection, scale, lk)
  m = qf.shape[-1]
  vf = v.astype(kf.dtype)
  if not causal:
    hs, zs = states.kv_states(kf, vf, chunk=lk, causal=False, num_chunks=1)
    qg = qf.reshape(b, lq, hkv, g, m)
    num = jnp.einsum("blhgm,bhmd->blhgd", qg, hs[:, :, 0], precision=_HI)
    den = jnp.einsum("blhgm,bhm->blhg", qg, zs[:, :, 0], precision=_HI)
  else:
    lp = -(-max(lq, lk) // chunk) * chunk
    pad = lambda x: jnp.pad(x, [(0, 0), (0, lp - x.shape[1])] +
                            [(0, 0)] * (x.ndim - 2))
    qf, kf, vf = pad(qf), pad(kf), pad(vf)
    nc = lp // chunk
    hs, zs = states.kv_states(kf, vf, chunk=chunk, causal=True,
                              num_chunks=nc)
    qc = qf.reshape(b, nc, chunk, hkv, g, m)
    kc = kf.reshape(b, nc, chunk, hkv, m)
    vc = vf.reshape(b, nc, chunk, hkv, d)
    num = jnp.einsum("bclhgm,bhcmd->bclhgd", qc, hs, precision=_HI)
    den = jnp.einsum("bclhgm,bhcm->bclhg", qc, zs, precision=_HI)
    u = jnp.einsum("bclhgm,bcjhm->bclhgj", qc, kc, precision=_HI)
    u = jnp.where(jnp.tril(jnp.ones((chunk, chunk), bool))[
        None, None, :, None, None, :], u, 0.0)
    num = num + jnp.einsum("bclhgj,bcjhd->bclhgd", u, vc, precision=_HI)
    den = den + u.sum(-1)
    num = num.reshape(b, lp, hkv, g, d)[:, :lq]
    den = den.reshape(b, lp, hkv, g)[:, :lq]
  out = num / jnp.maximum(den, TINY)[..., None]
  return out.reshape(b, lq, h, d).astype(q.dtype)
