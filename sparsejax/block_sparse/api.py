"""`sparsejax.attention`: the public entry point over every implementation."""

from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp

from sparsejax.block_sparse.implementations import REGISTRY
from sparsejax.block_sparse import reference
from sparsejax.block_sparse.block_mask import BlockMask, next_power_of_2
from sparsejax.block_sparse import masks as masks_lib
from sparsejax.block_sparse import score_mods
from sparsejax.block_sparse import segments as segments_lib
from sparsejax.block_sparse.vjp import StaticConfig
from sparsejax.parallel import block_sparse as parallel_block_sparse

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _validate(q, k, v, mask):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "ndim") or x.ndim != 4:
      raise ValueError(f"{name} must be a rank-4 array [batch, len, heads, "
                       f"head_dim], got shape {getattr(x, 'shape', None)}")
    if x.dtype not in _DTYPES:
      raise TypeError(f"{name} must be float32, bfloat16 or float16, got "
                      f"{x.dtype}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                    f"{v.dtype}")
  b, lq, h, d = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got {k.shape} and "
                     f"{v.shape}")
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k must be [batch={b}, kv_len, kv_heads, head_dim={d}],"
                     f" got {k.shape}")
  if h % k.shape[2]:
    raise ValueError(f"q heads ({h}) must be divisible by kv heads "
                     f"({k.shape[2]})")
  if not 8 <= d <= 256:
    raise ValueError(f"head_dim must be in [8, 256], got {d}")
  if mask is not None:
    if not isinstance(mask, BlockMask):
      raise TypeError(f"mask must be None or a sparsejax.BlockMask, got "
                      f"{type(mask).__name__}")
    mask.check_compatible(batch=b, heads=h, q_len=lq, kv_len=k.shape[1])


def _pad_axis(x, axis, size):
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _check_scalar(name, value, positive=False):
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be a real number, got {value!r}") from None
  if not math.isfinite(value) or (positive and value <= 0):
    raise ValueError(f"{name} must be a finite"
                     f"{' positive' if positive else ''} number, got {value}")
  return value


def attention(q, k, v, mask: Optional[BlockMask] = None, *,
              scale: Optional[float] = None, soft_cap: Optional[float] = None,
              score_mod=None, q_segment_ids=None, kv_segment_ids=None,
              impl: str = "auto", interpret: bool = False,
              return_lse: bool = False, tuning=None):
  """Block-sparse softmax attention.

  Args:
    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads,
      head_dim] with heads % kv_heads == 0 (GQA/MQA).
    mask: None (dense, bidirectional) or a `BlockMask` built for
      (q_len, kv_len).
    scale: logit scale, default head_dim ** -0.5.
    soft_cap: if set, logits become soft_cap * tanh(logits / soft_cap).
    score_mod: None or a `sparsejax.score_mods.ScoreMod`: each visible logit
      becomes score_mod(scale * q.k, b, h, q_idx, kv_idx) before the soft-cap
      (gradients reach its array fields).
    q_segment_ids, kv_segment_ids: None or int [batch, q_len] / [batch,
      kv_len]: a pair is visible only where the ids are equal (packed
      documents; pad with an id no real token uses). One alone serves both
      when q_len == kv_len. Blocks whose ids cannot match are skipped.
    impl: "reference", "xla", "pallas_triton", "pallas_mosaic_gpu",
      "pallas_tpu" or "auto".
    interpret: run a Pallas implementation in interpret mode (CPU).
    return_lse: also return the log-sum-exp [batch, heads, q_len] (f32).
    tuning: implementation-specific settings (e.g. the Triton kernel's
      `pallas_kernels.gpu.block_sparse_attention.TuningConfig`); None picks
      defaults.

  Softmax is in f32 whatever the input dtype; a query row with no visible key
  gives output 0, lse -inf and zero gradients.
  """
  _validate(q, k, v, mask)
  if not isinstance(impl, str):
    raise ValueError(f"impl must be a string, one of "
                     f"{sorted(REGISTRY.names())}, got {impl!r}")
  b, lq, h, d = q.shape
  lk = k.shape[1]
  scale = _check_scalar("scale", d ** -0.5 if scale is None else scale)
  if soft_cap is not None:
    soft_cap = _check_scalar("soft_cap", soft_cap, positive=True)
  score_mods.check(score_mod)
  segs = segments_lib.validate(q_segment_ids, kv_segment_ids, batch=b,
                               q_len=lq, kv_len=lk)
  user_mask = mask
  if mask is None:
    mask = masks_lib.full(lq, lk, block_size=(min(128, next_power_of_2(max(
        lq, 16))), min(128, next_power_of_2(max(lk, 16)))))
  bq, bk = mask.block_q, mask.block_kv
  implementation = REGISTRY.resolve(
      impl, interpret, problem=(q.dtype, d, bq, bk, score_mod,
                                segs is not None))
  if implementation.dense:
    out, lse = reference.attention_reference(
        q, k, v, user_mask, scale=scale, soft_cap=soft_cap,
        score_mod=score_mod, q_segment_ids=None if segs is None else segs[0],
        kv_segment_ids=None if segs is None else segs[1])
    return (out, lse) if return_lse else out

  lq_pad, lk_pad = mask.num_q_blocks * bq, mask.num_kv_blocks * bk
  d_pad = next_power_of_2(d) if implementation.pad_head_dim_pow2 else d
  qp = _pad_axis(_pad_axis(q, 1, lq_pad), 3, d_pad)
  kp = _pad_axis(_pad_axis(k, 1, lk_pad), 3, d_pad)
  vp = _pad_axis(_pad_axis(v, 1, lk_pad), 3, d_pad)
  params, treedef = score_mods.flatten(score_mod)
  cfg = StaticConfig(block_q=bq, block_kv=bk, q_len=lq, kv_len=lk,
                     mask_fn=mask.kernel_mask_fn, scale=scale,
                     soft_cap=soft_cap, interpret=interpret, tuning=tuning,
                     score_mod=treedef, segments=segs is not None)
  # Per shard under a device mesh (sparsejax.parallel); as is without one.
  out, lse = parallel_block_sparse.run(implementation.load(), qp, kp, vp,
                                       mask, segs, params, cfg)
  out, lse = out[:, :lq, :, :d], lse[:, :, :lq]
  return (out, lse) if return_lse else out
