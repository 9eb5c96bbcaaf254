"""`scatterbrain_attention`: the public entry point over every implementation."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from sparsejax.block_sparse import masks as masks_lib
from sparsejax.block_sparse.block_mask import BlockMask, broadcast_lists
from sparsejax.block_sparse.block_mask import next_power_of_2
from sparsejax.lowrank import checks
from sparsejax.lowrank import reference
from sparsejax.lowrank.implementations import FEATURE_PAD, REGISTRY
from sparsejax.lowrank.vjp import Config
from sparsejax.parallel.block_sparse import per_shard_with_mask_fn


# Jitted: the dense reference is ~100 ops, slow to dispatch one by one.
_reference = jax.jit(reference.scatterbrain_reference,
                     static_argnames=("causal", "scale"))


def _pad_axis(x, axis, size):
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _default_block(length):
  return min(128, next_power_of_2(max(length, 16)))


def empty_support(q_len: int, kv_len: int, *, block_size=None) -> BlockMask:
  """A BlockMask that lists nothing (Scatterbrain is then Performer)."""
  bq, bk = block_size or (_default_block(q_len), _default_block(kv_len))
  return masks_lib.from_block_mask(
      jnp.zeros((-(-q_len // bq), -(-kv_len // bk)), bool),
      block_size=(bq, bk), q_len=q_len, kv_len=kv_len)


def scatterbrain_attention(q, k, v, mask: Optional[BlockMask], projection, *,
                           causal: bool = False,
                           scale: Optional[float] = None, impl: str = "auto",
                           interpret: bool = False, tuning=None):
  """Scatterbrain: Performer attention made exact on a sparse support.

  out_i = num_i / den_i with, for S(i) the support and A(i) all keys (or
  j <= i when causal),
    num_i = sum_{S(i)} (e^{s_ij} - phi_i.phi_j) v_j + phi_i^T sum_{A(i)} phi_j v_j^T
    den_i = sum_{S(i)} e^{s_ij} + max(phi_i . sum_{A(i)} phi_j
                                      - sum_{S(i)} phi_i.phi_j, eps_i),
  s_ij = scale * q_i . k_j, phi the Performer features (`performer_features`)
  and eps_i = 1e-24 in the rows' stabilised units (the official code's clamp
  of the low-rank normaliser; see reference.py for what it implies: no NaN,
  an empty support gives Performer, a full one exact softmax attention).

  Args:
    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads,
      head_dim] with heads % kv_heads == 0 (GQA/MQA).
    mask: the sparse support, a `sparsejax.BlockMask` for (q_len, kv_len)
      (any mask of the core: sliding windows, S2, block patterns, ...), or
      None for an empty support. Under causal=True it must not reach a
      future key (checked when the mask is concrete).
    projection: W [num_features, head_dim], fixed (no gradient), e.g.
      `orthogonal_gaussian_projection`.
    causal: A(i) = keys j <= i (top-left aligned), as `masks.causal`.
    scale: score scale, default head_dim ** -0.5.
    impl: "reference", "xla", "pallas_triton", "pallas_tpu" or "auto".
    interpret: run a Pallas implementation in interpret mode (CPU).
    tuning: implementation-specific settings (None: defaults).

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype; the arithmetic is f32.
  """
  checks.qkv(q, k, v, projection)
  b, lq, h, d = q.shape
  lk = k.shape[1]
  if not 8 <= d <= 256:
    raise ValueError(f"head_dim must be in [8, 256], got {d}")
  if not isinstance(causal, bool):
    raise TypeError(f"causal must be a bool, got {causal!r}")
  if not isinstance(impl, str):
    raise ValueError(f"impl must be a string, one of "
                     f"{sorted(REGISTRY.names())}, got {impl!r}")
  user_mask = mask
  if mask is not None:
    checks.mask_fits(mask, q, k)
    if causal:
      checks.causal_support(mask)
  else:
    mask = empty_support(lq, lk)
  scale = float(d ** -0.5 if scale is None else scale)
  m = projection.shape[0]
  bq, bk = mask.block_q, mask.block_kv
  implementation = REGISTRY.resolve(
      impl, interpret, problem=(q.dtype, d, bq, bk, m, causal, bool(interpret)))
  if implementation.dense:
    return _reference(q, k, v, user_mask, projection, causal=causal,
                      scale=scale)

  lists = broadcast_lists(mask, b, h)
  if causal:
    # Rows seed their own chunk's keys (j <= i) from the kv arrays at the q
    # block's position and columns their chunk's queries: one padded length
    # for both sides, and empty list rows for the blocks the mask lacks.
    lq_pad = lk_pad = -(-max(lq, lk) // max(bq, bk)) * max(bq, bk)
    for f, x in lists.items():
      lists[f] = _pad_axis(x, 2, (lk_pad // bk) if f.endswith("_t") else
                           (lq_pad // bq))
  else:
    lq_pad, lk_pad = mask.num_q_blocks * bq, mask.num_kv_blocks * bk
  d_pad = next_power_of_2(d) if implementation.pad_head_dim_pow2 else d
  qp = _pad_axis(_pad_axis(q, 1, lq_pad), 3, d_pad)
  kp = _pad_axis(_pad_axis(k, 1, lk_pad), 3, d_pad)
  vp = _pad_axis(_pad_axis(v, 1, lk_pad), 3, d_pad)
  wp = _pad_axis(projection, 1, d_pad)
  pad_features = FEATURE_PAD.get(implementation.name, lambda m, i: m)
  cfg = Config(block_q=bq, block_kv=bk, q_len=lq, kv_len=lk,
               mask_fn=mask.kernel_mask_fn, scale=scale, causal=causal,
               num_features=m, feature_pad=pad_features(m, interpret),
               interpret=interpret, tuning=tuning)
  # Per (batch, head) shard under a device mesh (sparsejax.parallel).
  out = per_shard_with_mask_fn(
      implementation.load(), (qp, kp, vp, wp, lists),
      ("b.h.", "b.h.", "b.h.", "", "bh"), "b.h.", cfg, batch=b, heads=h,
      name="scatterbrain_attention")
  return out[:, :lq, :, :d]
