"""Dense jax.numpy references: the definitions every implementation matches.

They compute in the promoted float dtype (f32, or f64 for f64 inputs, which
the tests use as ground truth), materialise the [L_q, L_kv] matrices and are
meant for small sizes. Gradients are plain autodiff.

Scatterbrain (HazyResearch/scatterbrain, sblocal_attention.py and
sbblocksparse_attention.py), with phi the Performer features, S(i) the sparse
support (the BlockMask) and A(i) all keys (or j <= i when causal):

  num_i = sum_{j in S(i)} (e^{s_ij} - phi_i.phi_j) v_j + phi_i^T sum_{A(i)} phi_j v_j^T
  den_i = sum_{j in S(i)} e^{s_ij} + max(phi_i . sum_{A(i)} phi_j
                                         - sum_{j in S(i)} phi_i.phi_j, eps_i)
  out_i = num_i / den_i

The second term of den_i is the low-rank mass outside the support,
sum over A(i) minus S(i) of phi_i.phi_j: positive in exact arithmetic (the
features are positive and S(i) lies inside A(i)), but a difference of two
sums that can round to zero or below when the support covers nearly all of
A(i). As the official code does (`.clamp_min_(1e-24)` on
q'.sum(k') - sum(dots'), in the stabilised units), it is clamped at
eps_i = 1e-24 * exp(c_i), c_i the row's feature log-scale; so den_i > 0
always and no row gives NaN: a row with an empty support is Performer's, a
row whose support is all of A(i) is exact softmax attention. The clamp is
the only place the stabilisation's scale shows through, at 1e-24 of it. The
per-entry weights e^{s_ij} - phi_i.phi_j on the support can be negative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.lowrank import features as features_lib

TINY = 1e-24  # the official clamp of the low-rank normaliser


def _low_rank_parts(q, k, v, projection, scale):
  """Per-head dense pieces: q_hat k_hat^T, log scales, scores and values."""
  b, lq, h, _ = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  dt = jnp.promote_types(q.dtype, jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  qh, cq = features_lib.query_features(q, projection, scale)
  kh, ck = features_lib.key_features(k, projection, scale, lk)
  kh = jnp.repeat(kh, h // hkv, axis=2)
  ck = jnp.repeat(ck, h // hkv, axis=1)
  u = jnp.einsum("bqhm,bkhm->bhqk", qh, kh, precision=hi)
  pls = cq + ck[:, :, None]  # log(phi_i.phi_j / u_ij)  [B, H, Lq]
  kr = jnp.repeat(k, h // hkv, axis=2).astype(dt)
  vr = jnp.repeat(v, h // hkv, axis=2).astype(dt)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dt), kr, precision=hi) * scale
  allowed = jnp.ones((lq, lk), bool)
  return u, pls, s, vr, allowed, (b, h, lq, lk)


def _causal(lq, lk):
  return jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None]


def scatterbrain_reference(q, k, v, mask, projection, *, causal: bool = False,
                           scale: float):
  """Scatterbrain attention [B, Lq, H, D] by its definition (module doc).

  mask: a `BlockMask` (the support S) or None (empty support).
  """
  u, pls, s, vr, allowed, (b, h, lq, lk) = _low_rank_parts(q, k, v,
                                                           projection, scale)
  if causal:
    allowed = _causal(lq, lk)
  if mask is None:
    support = jnp.zeros((1, 1, lq, lk), bool)
  else:
    support = mask.to_dense()
  support = jnp.broadcast_to(support, (b, h, lq, lk))
  allowed = jnp.broadcast_to(allowed, (b, h, lq, lk))
  # Row shift M >= every exponent: cancels between num and den.
  big = jnp.max(jnp.where(support, s, -jnp.inf), -1)
  shift = jax.lax.stop_gradient(jnp.maximum(pls, big))[..., None]
  e = jnp.where(support, jnp.exp(s - shift), 0.0)
  lr = u * jnp.exp(pls[..., None] - shift)  # phi_i.phi_j / e^M
  w = jnp.where(support, e - lr, 0.0) + jnp.where(allowed, lr, 0.0)
  rest = (jnp.where(allowed, u, 0.0).sum(-1)
          - jnp.where(support, u, 0.0).sum(-1))
  den = e.sum(-1) + jnp.maximum(rest, TINY) * jnp.exp(pls - shift[..., 0])
  out = jnp.einsum("bhqk,bkhd->bqhd", w / den[..., None], vr,
                   precision=jax.lax.Precision.HIGHEST)
  return out.astype(q.dtype)


def performer_reference(q, k, v, projection, *, causal: bool = False,
                        scale: float):
  """Performer attention by its definition, dense:
  out_i = phi_i^T sum_{A(i)} phi_j v_j^T / max(phi_i . sum_{A(i)} phi_j, eps_i)
  (the clamp as Scatterbrain's, so an empty support reproduces this)."""
  u, _, _, vr, allowed, (_, _, lq, lk) = _low_rank_parts(q, k, v, projection,
                                                         scale)
  if causal:
    allowed = _causal(lq, lk)
  u = jnp.where(allowed, u, 0.0)
  den = jnp.maximum(u.sum(-1), TINY)
  out = jnp.einsum("bhqk,bkhd->bqhd", u / den[..., None], vr,
                   precision=jax.lax.Precision.HIGHEST)
  return out.astype(q.dtype)
