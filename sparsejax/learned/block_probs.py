"""`block_attention_probs`: SeerAttention's block-level ground truth.

P[b, h, I, J] = max over the rows of q block I and the columns of kv block J
of the attention probabilities softmax_j(scale * q_i . k_j), each row
normalised over its whole (causal) row, then row-normalised over the kv
blocks (`normalize`), as the official `attn_pooling_kernel_2d.py` does. The
definition is `reference.block_attention_probs_reference`.

Every implementation walks each q block's kv blocks twice (the row lse, then
the block maxima), so memory is O(L) plus the [nq, nk] output: no
[L, nk] row-max buffer as in the official kernel, at the price of a second
q.k pass.

Backward (custom_vjp, shared by all implementations): the maximum of block
(I, J) is exp(s_ij - lse_i) at its argmax (i, j), so with w = dP/dU * U the
gradient is w at s_ij plus -w on lse_i. The lse part is the backward of
`sj.attention` with an lse cotangent (the core's kernels); the argmax part is
one scatter per block pair.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from sparsejax.block_sparse.api import attention as _attention
from sparsejax.block_sparse import masks as masks_lib
from sparsejax.block_sparse.block_mask import next_power_of_2
from sparsejax.learned import reference
from sparsejax.learned.implementations import PROBS_REGISTRY
from sparsejax.learned.probs_math import ProbsConfig
from sparsejax.parallel import per_shard

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _validate(q, k, block_size):
  for name, x in (("q", q), ("k", k)):
    if not hasattr(x, "ndim") or x.ndim != 4:
      raise ValueError(f"{name} must be a rank-4 array [batch, len, heads, "
                       f"head_dim], got shape {getattr(x, 'shape', None)}")
    if x.dtype not in _DTYPES:
      raise TypeError(f"{name} must be float32, bfloat16 or float16, got "
                      f"{x.dtype}")
  if q.dtype != k.dtype:
    raise TypeError(f"q and k must share a dtype, got {q.dtype}, {k.dtype}")
  b, _, h, d = q.shape
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k must be [batch={b}, kv_len, kv_heads, head_dim={d}],"
                     f" got {k.shape}")
  if h % k.shape[2]:
    raise ValueError(f"q heads ({h}) must be divisible by kv heads "
                     f"({k.shape[2]})")
  if (not isinstance(block_size, int) or isinstance(block_size, bool)
      or block_size < 16 or block_size & (block_size - 1)):
    raise ValueError(f"block_size must be a power of two >= 16, got "
                     f"{block_size!r}")


def _pad_len(x, size):
  return jnp.pad(x, ((0, 0), (0, size - x.shape[1]), (0, 0), (0, 0)))


def _pad_dim(x, size):
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, size - x.shape[3])))


def block_attention_probs(q, k, *, block_size: int = 64, causal: bool = True,
                          scale: Optional[float] = None,
                          normalize: bool = True, impl: str = "auto",
                          interpret: bool = False, tuning=None):
  """Block max-pooled attention probabilities [B, H, nq, nk] (f32).

  Args:
    q: [batch, q_len, heads, head_dim]; k: [batch, kv_len, kv_heads,
      head_dim] with heads % kv_heads == 0 (GQA: per query head).
    block_size: rows and columns per block (a power of two >= 16); the last
      block of a ragged length is partial.
    causal: query i sees keys j <= i (top-left aligned).
    scale: logit scale, default head_dim ** -0.5.
    normalize: divide each (b, h, q block) row by its sum over kv blocks.
    impl: "reference", "xla", "pallas_triton", "pallas_tpu" or "auto".
    interpret: run a Pallas implementation in interpret mode (CPU).
    tuning: the Pallas kernel's TuningConfig (None: defaults).

  Returns:
    f32 [batch, heads, ceil(q_len / block), ceil(kv_len / block)]; blocks
    with no visible entry are 0. Differentiable in q and k.
  """
  _validate(q, k, block_size)
  if not isinstance(impl, str):
    raise ValueError(f"impl must be a string, one of "
                     f"{sorted(PROBS_REGISTRY.names())}, got {impl!r}")
  d = q.shape[3]
  scale = float(d ** -0.5 if scale is None else scale)
  if not math.isfinite(scale) or scale <= 0:
    raise ValueError(f"scale must be a positive finite float, got {scale}")
  implementation = PROBS_REGISTRY.resolve(
      impl, interpret, problem=(q.dtype, d, block_size, bool(interpret)))
  if implementation.dense:
    return reference.block_attention_probs_reference(
        q, k, block_size=block_size, causal=causal, scale=scale,
        normalize=normalize)
  lq, lk = q.shape[1], k.shape[1]
  nq, nk = -(-lq // block_size), -(-lk // block_size)
  qp, kp = _pad_len(q, nq * block_size), _pad_len(k, nk * block_size)
  if implementation.pad_head_dim_pow2:
    qp, kp = _pad_dim(qp, next_power_of_2(d)), _pad_dim(kp, next_power_of_2(d))
  cfg = ProbsConfig(block=block_size, q_len=lq, kv_len=lk, causal=causal,
                    scale=scale, interpret=interpret, tuning=tuning)
  vjp = _pooled_vjp(implementation.name)
  # Per (batch, head) shard under a device mesh (sparsejax.parallel).
  pooled = per_shard(lambda q, k: vjp(q, k, cfg), ("b.h.", "b.h."), "bh",
                     "block_attention_probs")(qp, kp)
  if normalize:
    z = pooled.sum(-1, keepdims=True)
    pooled = pooled / jnp.where(z > 0, z, 1.0)
  return pooled


@functools.lru_cache(maxsize=None)
def _pooled_vjp(impl_name: str):
  """custom_vjp of (q, k) -> unnormalised block maxima for one impl."""
  forward = PROBS_REGISTRY.get(impl_name).load()

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
  def pooled(q, k, cfg):
    return forward(q, k, cfg)[0]

  def fwd(q, k, cfg):
    u, arg = forward(q, k, cfg)
    return u, (q, k, u, arg)

  def bwd(cfg, res, g):
    q, k, u, arg = res
    return _backward(q, k, u, arg, g, cfg, impl_name)

  pooled.defvjp(fwd, bwd)
  return pooled


def _backward(q, k, u, arg, g, cfg: ProbsConfig, impl_name: str):
  """(dq, dk) of the block maxima U given the cotangent g (see module doc)."""
  b, lq_pad, h, d = q.shape
  lk_pad, hkv = k.shape[1], k.shape[2]
  bs = cfg.block
  nq, nk = u.shape[2], u.shape[3]
  w = (g * u).astype(jnp.float32)  # [B, H, nq, nk]
  rows = jnp.arange(nq)[:, None] * bs + arg // bs  # argmax row, global
  cols = jnp.arange(nk)[None, :] * bs + arg % bs

  # The lse part through the core's attention backward (an lse cotangent).
  bi = jnp.arange(b)[:, None, None, None]
  hi = jnp.arange(h)[None, :, None, None]
  dlse = jnp.zeros((b, h, lq_pad), jnp.float32).at[bi, hi, rows].add(-w)
  lq, lk = cfg.q_len, cfg.kv_len
  qt, kt = q[:, :lq], k[:, :lk]
  mask_block = min(128, next_power_of_2(max(lq, lk, 16)))
  mask = masks_lib.causal(lq, lk, block_size=mask_block) if cfg.causal else (
      masks_lib.full(lq, lk, block_size=mask_block))

  def lse_of(qq, kk):
    return _attention(qq, kk, jnp.zeros_like(kk), mask, scale=cfg.scale,
                      impl=impl_name, interpret=cfg.interpret,
                      return_lse=True)[1]

  _, vjp = jax.vjp(lse_of, qt, kt)
  dq_lse, dk_lse = vjp(dlse[:, :, :lq])

  # The argmax part: d s_ij = w at each block's argmax, one head at a time
  # (a [B, nq * nk, D] gather per head bounds the memory).
  group = h // hkv
  qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)

  def per_head(hh):
    ww = w[:, hh].reshape(b, -1)
    ii, jj = rows[:, hh].reshape(b, -1), cols[:, hh].reshape(b, -1)
    qh, kh = qf[:, :, hh], kf[:, :, hh // group]
    kg = jnp.take_along_axis(kh, jj[..., None], axis=1)
    qg = jnp.take_along_axis(qh, ii[..., None], axis=1)
    bb = jnp.arange(b)[:, None]
    dqh = jnp.zeros((b, lq_pad, d), jnp.float32).at[bb, ii].add(
        ww[..., None] * kg)
    dkh = jnp.zeros((b, lk_pad, d), jnp.float32).at[bb, jj].add(
        ww[..., None] * qg)
    return dqh, dkh

  dq_arg, dk_arg = jax.lax.map(per_head, jnp.arange(h))  # [H, B, L, D]
  dq_arg = jnp.moveaxis(dq_arg, 0, 2) * cfg.scale
  dk_arg = jnp.moveaxis(dk_arg, 0, 2).reshape(b, lk_pad, hkv, group, d).sum(
      3) * cfg.scale
  dq = dq_arg.at[:, :lq].add(dq_lse.astype(jnp.float32))
  dk = dk_arg.at[:, :lk].add(dk_lse.astype(jnp.float32))
  return dq.astype(q.dtype), dk.astype(k.dtype)
