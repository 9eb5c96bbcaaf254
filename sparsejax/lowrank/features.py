"""Performer positive random features (FAVOR+), as Scatterbrain uses them.

Scores are s_ij = c * q_i . k_j (c = scale). With x' = x * sqrt(c) and a
projection W [m, d], the feature map is

  phi(x) = exp(x' W^T - |x'|^2 / 2) / sqrt(m),

so E[phi(q_i) . phi(k_j)] = exp(s_ij) for Gaussian rows of W. Scatterbrain
(HazyResearch/scatterbrain, feature_maps_sb.py) uses the "cosh" variant:
m / 2 Gaussian orthogonal rows W0 and W = [W0; -W0], which
`orthogonal_gaussian_projection(..., cosh=True)` returns, so one formula
serves both variants.

Stabilisation (the official code's log scales, which change no result):
queries keep a per-row scale, phi_hat_i = exp(log phi_i - c_i) with
c_i = max_r log phi_ir, keys one scale per (batch, kv head) over the whole
sequence, so phi_i . phi_j = phi_hat_i . phi_hat_j * exp(c_i + c_k).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp


def orthogonal_gaussian_projection(key: jax.Array, num_features: int,
                                   head_dim: int, *, cosh: bool = True,
                                   scaling: int = 0,
                                   dtype=jnp.float32) -> jax.Array:
  """A projection W [num_features, head_dim] of Gaussian orthogonal rows.

  As `gaussian_orthogonal_random_matrix` of the official code: blocks of
  head_dim orthonormal rows (QR of a Gaussian matrix with the signs of R's
  diagonal folded in: Haar distributed), the rows scaled by the norms of
  independent Gaussian vectors (scaling=0) or by sqrt(head_dim) (scaling=1).

  Args:
    key: PRNG key.
    num_features: m, the feature count (even when cosh).
    head_dim: d.
    cosh: Scatterbrain's default: m / 2 rows W0, returned as [W0; -W0].
    scaling: 0 (chi-distributed row norms) or 1 (norm sqrt(head_dim)).
    dtype: of the result.
  """
  if not isinstance(num_features, int) or num_features < 1:
    raise ValueError(f"num_features must be a positive int, got "
                     f"{num_features!r}")
  if not isinstance(head_dim, int) or head_dim < 1:
    raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
  if cosh and num_features % 2:
    raise ValueError(f"num_features must be even with cosh=True (rows come "
                     f"in +/- pairs), got {num_features}")
  if scaling not in (0, 1):
    raise ValueError(f"scaling must be 0 or 1, got {scaling!r}")
  rows = num_features // 2 if cosh else num_features
  k_blocks, k_norms = jax.random.split(key)
  blocks = -(-rows // head_dim)
  g = jax.random.normal(k_blocks, (blocks, head_dim, head_dim), jnp.float32)
  qmat, rmat = jnp.linalg.qr(g)
  qmat = qmat * jnp.sign(jnp.diagonal(rmat, axis1=-2, axis2=-1))[:, None, :]
  ortho = jnp.swapaxes(qmat, -1, -2).reshape(-1, head_dim)[:rows]
  if scaling == 0:
    norms = jnp.linalg.norm(
        jax.random.normal(k_norms, (rows, head_dim), jnp.float32), axis=1)
  else:
    norms = jnp.full((rows,), math.sqrt(head_dim), jnp.float32)
  w = norms[:, None] * ortho
  if cosh:
    w = jnp.concatenate([w, -w], axis=0)
  return w.astype(dtype)


def check_projection(projection, head_dim: int) -> None:
  """ValueError/TypeError unless projection is a float [m, head_dim] array."""
  if not hasattr(projection, "ndim") or not hasattr(projection, "dtype"):
    raise TypeError(f"projection must be an array [num_features, head_dim], "
                    f"got {type(projection).__name__}")
  if projection.ndim != 2 or projection.shape[1] != head_dim:
    raise ValueError(f"projection must be [num_features, head_dim={head_dim}]"
                     f", got shape {tuple(projection.shape)}")
  if not jnp.issubdtype(projection.dtype, jnp.floating):
    raise TypeError(f"projection must be a float array, got "
                    f"{projection.dtype}")


def _low_precision(dtype) -> bool:
  return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def log_features(x, projection, scale: float):
  """log phi(x) [..., m] in the promoted float dtype (f32 at least).

  bf16/fp16 inputs take x' W^T as a native matmul with f32 accumulation
  (sqrt(scale) folded into W before its rounding): the log-features move by
  ~2^-9 of their spread, a slightly different but still positive random
  feature map, used consistently everywhere. f32/f64 inputs are exact.
  """
  dt = jnp.promote_types(x.dtype, jnp.float32)
  m = projection.shape[0]
  w = projection.astype(dt) * math.sqrt(scale)
  if _low_precision(x.dtype):
    a = jnp.einsum("...d,md->...m", x, w.astype(x.dtype),
                   preferred_element_type=dt)
  else:
    a = jnp.einsum("...d,md->...m", x.astype(dt), w,
                   precision=jax.lax.Precision.HIGHEST)
  xf = x.astype(dt)
  return a - (0.5 * scale) * jnp.sum(xf * xf, -1, keepdims=True) - (
      0.5 * math.log(m))


def performer_features(x, projection, *, scale: Optional[float] = None,
                       return_log_scale: bool = False):
  """Positive random features phi(x) = exp(x' W^T - |x'|^2/2) / sqrt(m).

  Args:
    x: [..., head_dim] queries or keys.
    projection: W [m, head_dim] (e.g. `orthogonal_gaussian_projection`).
    scale: the score scale c (default head_dim ** -0.5); x' = x * sqrt(c).
    return_log_scale: return (phi_hat, log_scale) with phi = phi_hat *
      exp(log_scale) and log_scale [..., 1] the row's largest log-feature
      (the official forward_queries' scale): phi_hat is in (0, 1] and never
      overflows where phi itself would.

  Returns:
    phi [..., m] (f32, or f64 for f64 inputs), or (phi_hat, log_scale).
  """
  if not hasattr(x, "shape"):
    raise TypeError(f"x must be an array, got {type(x).__name__}")
  d = x.shape[-1]
  check_projection(projection, d)
  scale = float(d ** -0.5 if scale is None else scale)
  logf = log_features(x, projection, scale)
  log_scale = jax.lax.stop_gradient(jnp.max(logf, -1, keepdims=True))
  phi_hat = jnp.exp(logf - log_scale)
  if return_log_scale:
    return phi_hat, log_scale
  return phi_hat * jnp.exp(log_scale)


def query_features(q, projection, scale: float):
  """(q_hat [B, L, H, m], log scale [B, H, L]) with a per-row scale."""
  logf = log_features(q, projection, scale)
  c = jax.lax.stop_gradient(jnp.max(logf, -1))
  return jnp.exp(logf - c[..., None]), jnp.swapaxes(c, 1, 2)


def key_features(k, projection, scale: float, kv_len: int):
  """(k_hat [B, L, Hkv, m], log scale [B, Hkv]): one scale per (batch, kv
  head), the largest log-feature over the first kv_len keys (the official
  forward_keys' scale); rows at or past kv_len (padding) are zero."""
  logf = log_features(k, projection, scale)
  valid = (jnp.arange(k.shape[1]) < kv_len)[None, :, None, None]
  c = jax.lax.stop_gradient(
      jnp.max(jnp.where(valid, logf, -jnp.inf), axis=(1, 3)))
  return jnp.where(valid, jnp.exp(logf - c[:, None, :, None]), 0.0), c
