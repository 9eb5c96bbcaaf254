"""`sj.dot_product_attention`: a drop-in for `jax.nn.dot_product_attention`.

Same arguments, shapes and results (checked argument by argument against it
in the tests). Causal masks, local windows and sequence lengths go through
the block-sparse implementations: the window becomes a band `BlockMask`
(blocks outside it are skipped) and sequence lengths become segment ids
(padded query rows and keys never match). A dense `bias` or boolean `mask`
has no block structure to exploit: those calls take jax.nn's own XLA
implementation, the definition, with a one-time log line.

Semantics kept from jax.nn (they differ from `sj.attention`'s conventions):
  * masked logits are a large negative number, not -inf, so a query row with
    no visible key (e.g. key_value_seq_lengths = 0) averages ALL values
    uniformly; `sj.attention` gives 0 there, so those rows are patched;
  * rows past query_seq_lengths are zeroed (output and gradients);
  * the residual (logsumexp) is [B, T, N] in the key dtype, no gradient.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.block_sparse import masks as masks_lib
from sparsejax.block_sparse.api import attention as _attention
from sparsejax.block_sparse.block_mask import next_power_of_2
from sparsejax.block_sparse.implementations import REGISTRY
from sparsejax.block_sparse.segments import KV_PAD, Q_PAD

_LOGGED = set()
# implementation= names: jax.nn's, then sparsejax's own.
_IMPLEMENTATIONS = (None, "xla", "cudnn") + tuple(REGISTRY.names())


def _log_once(reason: str) -> None:
  if reason not in _LOGGED:
    _LOGGED.add(reason)
    logging.warning("sparsejax.dot_product_attention: %s", reason)


def _ensure_4d(x):
  x = jnp.asarray(x)
  return x.reshape((1,) * (4 - x.ndim) + x.shape) if x.ndim < 4 else x


def _check(t, shape, dtype, name):
  """jax.nn's shape and dtype checks, with its messages."""
  if t is None:
    return
  if t.ndim != len(shape):
    raise ValueError(f"{name} ndim should be {len(shape)}, but got {t.ndim}")
  if dtype is not None and t.dtype != dtype:
    raise ValueError(f"{name} dtype should be {dtype}, but got {t.dtype}")
  for i in range(t.ndim):
    if shape[i] != -1 and t.shape[i] != shape[i]:
      raise ValueError(f"{name} shape should be {shape}: but got {t.shape}")


def _band(is_causal: bool, window: Optional[Tuple[int, int]]):
  """(lo, hi) of lo <= q - kv <= hi, None for an open side."""
  lo, hi = (0 if is_causal else None), None
  if window is not None:
    left, right = window
    lo = -right if lo is None else max(lo, -right)
    hi = left
  return lo, hi


def _segment_ids(lengths, length: int, pad: int):
  if lengths is None:
    return None
  pos = jnp.arange(length, dtype=jnp.int32)[None]
  return jnp.where(pos < lengths[:, None], 0, pad).astype(jnp.int32)


def _large_negative():
  # jax.nn masks with -0.7 * finfo(logits dtype).max, logits in >= f32.
  return jnp.float32(-0.7 * float(np.finfo(np.float32).max))


def dot_product_attention(
    query, key, value, bias=None, mask=None, *, scale: Optional[float] = None,
    is_causal: bool = False, query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: Union[int, Tuple[int, int], None] = None,
    implementation: Optional[str] = None, return_residual: bool = False):
  """`jax.nn.dot_product_attention` on sparsejax's block-sparse kernels.

  Args:
    query: [B, T, N, H] or [T, N, H]; key, value: [B, S, K, H] or [S, K, H]
      with N % K == 0 (GQA/MQA).
    bias: optional, broadcastable to [B, N, T, S] (dense: jax.nn's XLA path).
    mask: optional bool, broadcastable to [B, N, T, S], True = attend (dense:
      jax.nn's XLA path).
    scale: logit scale, default 1 / sqrt(H).
    is_causal: key s visible to query t only if s <= t.
    query_seq_lengths, key_value_seq_lengths: optional int32 [B].
    local_window_size: (left, right): t sees s with t - left <= s <= t +
      right; an int w means (w, w).
    implementation: None (sparsejax "auto"), "xla" (sparsejax's blockwise
      XLA path), "cudnn" (jax.nn's cuDNN kernel, passed through), or any
      sparsejax impl name ("reference", "pallas_triton",
      "pallas_mosaic_gpu", "pallas_tpu", "auto").
    return_residual: also return the logsumexp [B, T, N] (or [T, N]).

  Returns:
    The output, shaped like query (and the residual if asked).
  """
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  kwargs = dict(scale=scale, is_causal=is_causal,
                query_seq_lengths=query_seq_lengths,
                key_value_seq_lengths=key_value_seq_lengths,
                local_window_size=local_window_size,
                return_residual=return_residual)
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(query, key, value, bias, mask,
                                        implementation="cudnn", **kwargs)
  output_shape = jnp.shape(query)
  q, k, v = _ensure_4d(query), _ensure_4d(key), _ensure_4d(value)
  b, s, kv_heads, h = k.shape
  _check(v, [b, s, kv_heads, h], k.dtype, "value")
  _check(q, [b, -1, -1, h], k.dtype, "query")
  if mask is not None:
    _check(_ensure_4d(mask), [-1] * 4, np.dtype(bool), "mask")
  if bias is not None:
    _check(_ensure_4d(bias), [-1] * 4, None, "bias")
  q_lens = (None if query_seq_lengths is None else
            jnp.asarray(query_seq_lengths))
  kv_lens = (None if key_value_seq_lengths is None else
             jnp.asarray(key_value_seq_lengths))
  _check(q_lens, [b], np.dtype("int32"), "query_seq_lengths")
  _check(kv_lens, [b], np.dtype("int32"), "key_value_seq_lengths")
  if q.shape[-2] % kv_heads:
    raise ValueError(f"The number of query heads must be a multiple of "
                     f"key/value heads, but got {q.shape[-2]} vs {kv_heads}")
  if isinstance(local_window_size, int):
    local_window_size = (local_window_size, local_window_size)

  why_dense = None
  if bias is not None or mask is not None:
    why_dense = "a dense bias/mask has no block structure"
  elif q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    why_dense = f"dtype {q.dtype} is not float32/bfloat16/float16"
  elif not 8 <= h <= 256:
    why_dense = f"head dim {h} is outside [8, 256]"
  if why_dense is not None:
    _log_once(f"{why_dense}: using jax.nn's dense XLA implementation")
    return jax.nn.dot_product_attention(query, key, value, bias, mask,
                                        implementation="xla", **kwargs)

  t = q.shape[1]
  lo, hi = _band(is_causal, local_window_size)
  block = (min(128, next_power_of_2(max(t, 16))),
           min(128, next_power_of_2(max(s, 16))))
  block_mask = (None if lo is None and hi is None else
                masks_lib.band(t, s, lo=lo, hi=hi, block_size=block))
  q_ids, kv_ids = _segment_ids(q_lens, t, Q_PAD), _segment_ids(kv_lens, s,
                                                               KV_PAD)
  if (q_ids is None) != (kv_ids is None):
    q_ids = jnp.zeros((b, t), jnp.int32) if q_ids is None else q_ids
    kv_ids = jnp.zeros((b, s), jnp.int32) if kv_ids is None else kv_ids
  impl = {None: "auto"}.get(implementation, implementation)
  out, lse = _attention(
      q, k, v, block_mask, scale=(1.0 / np.sqrt(h)) if scale is None else
      scale, q_segment_ids=q_ids, kv_segment_ids=kv_ids, impl=impl,
      return_lse=True)

  dead = jnp.swapaxes(jnp.isneginf(lse), 1, 2)  # [B, T, N]
  live_q = (jnp.ones((b, t), bool) if q_lens is None else
            jnp.arange(t)[None] < q_lens[:, None])
  if kv_lens is not None or local_window_size is not None:
    # jax.nn: a live row that sees no key averages every value uniformly.
    group = q.shape[2] // kv_heads
    mean_v = jnp.repeat(v.astype(jnp.float32).mean(1), group, axis=1)
    patch = dead & live_q[:, :, None]
    out = jnp.where(patch[..., None], mean_v[:, None].astype(out.dtype), out)
  out = jnp.reshape(out, output_shape)
  if not return_residual:
    return out
  res = jnp.where(dead, _large_negative() + jnp.log(jnp.float32(s)),
                  jnp.swapaxes(lse, 1, 2))
  res = jax.lax.stop_gradient(res.astype(k.dtype))
  return out, jnp.reshape(res, output_shape[:-1])
