"""`sj.linear.lightning_attention` and `lightning_decode`: the public entry
points over every implementation (see implementations.py)."""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.linear.implementations import DECODE_REGISTRY, REGISTRY
from sparsejax.parallel import per_shard

_DTYPES = tuple(map(jnp.dtype, (jnp.float32, jnp.bfloat16, jnp.float16,
                                jnp.float64)))


def _check_array(name, x, ndim, layout):
  if not hasattr(x, "ndim") or x.ndim != ndim:
    raise ValueError(f"{name} must be a rank-{ndim} array {layout}, got "
                     f"shape {getattr(x, 'shape', None)}")
  if jnp.dtype(x.dtype) not in _DTYPES:
    raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, "
                    f"got {x.dtype}")


def _check_slopes(slopes, heads):
  if not hasattr(slopes, "shape") or tuple(slopes.shape) != (heads,):
    raise ValueError(f"slopes must be [heads={heads}], got shape "
                     f"{getattr(slopes, 'shape', None)}")
  if not jnp.issubdtype(slopes.dtype, jnp.floating):
    raise TypeError(f"slopes must be floating point, got {slopes.dtype}")
  if isinstance(slopes, jax.core.Tracer):
    return  # values unknown under jit: checked when concrete
  s = np.asarray(slopes, np.float64)
  if not np.isfinite(s).all():
    raise ValueError(f"slopes must be finite, got {s}")
  if (s < 0).any():
    raise ValueError(f"slopes must be >= 0 (decay exp(-slope) <= 1), got "
                     f"{s}")


def _check_state(name, state, shape):
  if not hasattr(state, "shape") or tuple(state.shape) != shape:
    raise ValueError(f"{name} must be [batch, heads, d_k, d_v] = {shape}, got "
                     f"shape {getattr(state, 'shape', None)}")
  if jnp.dtype(state.dtype) not in (jnp.dtype(jnp.float32),
                                    jnp.dtype(jnp.float64)):
    raise ValueError(f"{name} must be float32 (the state is kept in f32), got "
                     f"{state.dtype}")


def _check_scale(scale):
  if not isinstance(scale, (int, float, np.floating)) or not math.isfinite(
      scale):
    raise ValueError(f"scale must be a finite Python float, got {scale!r}")
  return float(scale)


def _check_impl(impl, registry):
  if not isinstance(impl, str):
    raise ValueError(f"impl must be a string, one of "
                     f"{sorted(registry.names())}, got {impl!r}")


def lightning_attention(q, k, v, slopes, *, scale: float = 1.0,
                        initial_state=None, return_final_state: bool = False,
                        impl: str = "auto", interpret: bool = False,
                        chunk_size: Optional[int] = None, tuning=None):
  """Lightning Attention-2: causal linear attention with per-head decay.

  Per batch and head, with lam_h = exp(-slopes_h):
    S_{-1} = initial_state (or 0); S_t = lam S_{t-1} + k_t^T v_t;
    o_t = scale * q_t S_t.
  Slope 0 is plain causal linear attention (no normaliser, no softmax).

  Args:
    q, k: [batch, T, heads, d_k]; v: [batch, T, heads, d_v].
    slopes: [heads], >= 0 and finite (see `alibi_slopes`,
      `minimax_slopes`, `fla_lightning_slopes`).
    scale: multiplies q (1.0 in Lightning/MiniMax; fla defaults to
      d_k ** -0.5).
    initial_state: [batch, heads, d_k, d_v] float32, or None (zeros).
    return_final_state: also return the state after the last token.
    impl: "reference" (the recurrence), "xla" (chunked jnp), "pallas_triton",
      "pallas_tpu" or "auto".
    interpret: run a Pallas implementation in interpret mode (CPU).
    chunk_size: tokens per chunk of the chunked implementations (default
      64); results do not depend on it.
    tuning: implementation-specific settings (e.g.
      `pallas_kernels.gpu.lightning_attention.TuningConfig`).

  Returns:
    o [batch, T, heads, d_v] in q's dtype, and with return_final_state the
    final state [batch, heads, d_k, d_v] in float32. Gradients flow to q, k,
    v, slopes and initial_state on every implementation.
  """
  _check_array("q", q, 4, "[batch, T, heads, d_k]")
  _check_array("k", k, 4, "[batch, T, heads, d_k]")
  _check_array("v", v, 4, "[batch, T, heads, d_v]")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                    f"{v.dtype}")
  if k.shape != q.shape:
    raise ValueError(f"k must have q's shape {q.shape}, got {k.shape}")
  b, t, h, d = q.shape
  if v.shape[:3] != (b, t, h):
    raise ValueError(f"v must be [batch={b}, T={t}, heads={h}, d_v], got "
                     f"{v.shape}")
  if t < 1:
    raise ValueError("q must hold at least one token (T >= 1)")
  e = v.shape[-1]
  _check_slopes(slopes, h)
  scale = _check_scale(scale)
  if initial_state is not None:
    _check_state("initial_state", initial_state, (b, h, d, e))
  if chunk_size is not None and (not isinstance(chunk_size, int)
                                 or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  _check_impl(impl, REGISTRY)
  implementation = REGISTRY.resolve(
      impl, interpret, problem=(q.dtype, d, e, chunk_size, bool(interpret)))
  # Per (batch, head) shard under a device mesh (sparsejax.parallel).
  o, final = per_shard(functools.partial(
      implementation.load(), scale=scale, chunk_size=chunk_size,
      return_final_state=return_final_state, interpret=interpret,
      tuning=tuning), ("b.h.", "b.h.", "b.h.", "h", "bh"), ("b.h.", "bh"),
                       "lightning_attention")(q, k, v, slopes, initial_state)
  o = o.astype(q.dtype)
  if not return_final_state:
    return o
  state_dtype = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
  return o, final.astype(state_dtype)


def lightning_decode(q, k, v, state, slopes, *, scale: float = 1.0,
                     impl: str = "auto", interpret: bool = False,
                     tuning=None):
  """One token per sequence: new = lam * state + k^T v; o = scale q new.

  Args:
    q, k: [batch, heads, d_k]; v: [batch, heads, d_v].
    state: [batch, heads, d_k, d_v] float32 (e.g. a prefill's final state).
    slopes: [heads] as in `lightning_attention`.
    impl: "reference", "xla", "pallas_triton", "pallas_tpu" or "auto". The
      kernels are for inference (no gradient); "xla" differentiates.

  Returns:
    (o [batch, heads, d_v] in q's dtype, new_state float32). Continuing a
    prefill with it equals running `lightning_attention` over the whole
    sequence.
  """
  _check_array("q", q, 3, "[batch, heads, d_k]")
  _check_array("k", k, 3, "[batch, heads, d_k]")
  _check_array("v", v, 3, "[batch, heads, d_v]")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                    f"{v.dtype}")
  if k.shape != q.shape:
    raise ValueError(f"k must have q's shape {q.shape}, got {k.shape}")
  b, h, d = q.shape
  if v.shape[:2] != (b, h):
    raise ValueError(f"v must be [batch={b}, heads={h}, d_v], got {v.shape}")
  e = v.shape[-1]
  _check_state("state", state, (b, h, d, e))
  _check_slopes(slopes, h)
  scale = _check_scale(scale)
  _check_impl(impl, DECODE_REGISTRY)
  implementation = DECODE_REGISTRY.resolve(impl, interpret,
                                           problem=(q.dtype, d, e))
  o, new = per_shard(functools.partial(
      implementation.load(), scale=scale, interpret=interpret,
      tuning=tuning), ("bh", "bh", "bh", "bh", "h"), ("bh", "bh"),
                     "lightning_decode")(q, k, v, state, slopes)
  return o.astype(q.dtype), new.astype(state.dtype)
