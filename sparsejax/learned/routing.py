"""Routing Transformer attention (Roy et al., TACL 2021) on the core.

Tokens are routed by online mini-batch k-means on their (shared q/k)
routing vectors: `layer_norm` without scale, assignment by the largest dot
product with the centroids (google-research `routing_transformer/utils.py`).
Each cluster takes the `window` tokens nearest its centroid (equal-size
clusters: a token can sit in 0, 1 or several), the members sorted by
position; attention runs densely inside each cluster, causal by original
position, and a token's output is the mean over the clusters that hold it.

On the block-sparse core: the members are gathered into cluster-major order
(cluster c holds rows [c * window, (c + 1) * window)), so the clusters are
the diagonal blocks of a static block-diagonal `BlockMask`, and because the
members of a cluster are sorted by position, "causal by original position"
is plain causal on the gathered indices (`mask_fns.Causal` on the diagonal
sub-blocks). No position table reaches the kernels, which run forward and
backward. The dense definition is `reference.routing_attention_reference`.

Two deviations from the Google code, both deliberate: outputs are averaged
exactly (sum / count, where Google divides by count + 1e-2), so one cluster
holding every token is dense causal attention; and the EMA update is a pure
function (`kmeans_ema_update`) that the layer applies in the train step.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.block_sparse import mask_fns
from sparsejax.block_sparse import masks as masks_lib
from sparsejax.block_sparse.api import attention as _attention


def routing_norm(x, eps: float = 1e-6):
  """layer_norm(x, scaling=False) over the last axis, in f32."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def check_window(window: int, length: int, num_clusters: int):
  if (not isinstance(window, int) or window < 16 or window & (window - 1)):
    raise ValueError(f"window must be a power of two >= 16 (it is the "
                     f"cluster block of the BlockMask), got {window!r}")
  if window > length:
    raise ValueError(f"window ({window}) must be <= the sequence length "
                     f"({length})")
  if num_clusters < 1:
    raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")


def cluster_members(x_norm, centroids, window: int):
  """Sorted token indices int32 [B, H, C, window] of each cluster.

  x_norm: routing vectors [B, L, H, D] (after `routing_norm`); centroids
  [H, C, D]. Cluster c takes the `window` tokens with the largest dot
  product with its centroid, sorted by position.
  """
  check_window(window, x_norm.shape[1], centroids.shape[1])
  scores = jnp.einsum("blhd,hcd->bhcl", x_norm, centroids.astype(jnp.float32))
  _, idx = jax.lax.top_k(scores, window)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


def members_to_bool(idx, length: int):
  """bool [B, H, C, L] membership from `cluster_members` indices."""
  return jax.nn.one_hot(idx, length, dtype=jnp.bool_).any(-2)


def cluster_mask(num_clusters: int, window: int, causal: bool = True):
  """The block-diagonal mask of `num_clusters` clusters of `window` rows.

  Mask blocks are min(window, 128) wide (the kernels' tile limit); with
  causal, sub-blocks below a cluster's diagonal are full and its diagonal
  ones causal. Build it outside jit where possible (as the layer does): a
  concrete mask gets compact lists.
  """
  block = min(window, 128)
  per = window // block
  n = num_clusters * per
  cluster = np.arange(n) // per
  blocks = cluster[:, None] == cluster[None, :]
  if causal:
    blocks &= np.tril(np.ones((n, n), bool))
  return masks_lib.from_block_mask(
      blocks, block_size=block, mask_fn=mask_fns.Causal() if causal else None)


def _gather(x, idx, heads):
  """x [B, L, Hx, D] -> [B, C * W, heads, D], head h gathered at idx[:, h]."""
  b, _, hx, d = x.shape
  x = jnp.repeat(x, heads // hx, axis=2)
  flat = idx.reshape(b, heads, -1)  # [B, H, C * W]
  xh = jnp.swapaxes(x, 1, 2)  # [B, H, L, D]
  g = jnp.take_along_axis(xh, flat[..., None], axis=2)
  return jnp.swapaxes(g, 1, 2)


def routing_attention(q, k, v, idx, *, causal: bool = True,
                      scale: Optional[float] = None, mask=None,
                      impl: str = "auto", interpret: bool = False):
  """Attention within clusters, averaged back to token order.

  Args:
    q: [B, L, H, D]; k, v: [B, L, Hkv, D] (GQA).
    idx: int32 [B, H, C, W] cluster members sorted by position per cluster
      (`cluster_members`); W a power of two >= 16.
    causal: attend to members at or before the query position.
    scale: logit scale, default D ** -0.5.
    mask: `cluster_mask(C, W, causal)`, prebuilt (None: built here).
    impl: the `sj.attention` implementation of the in-cluster attention;
      "reference" runs the dense `routing_attention_reference`.
    interpret: Pallas interpret mode.

  Returns:
    [B, L, H, D]: the mean over the clusters holding each token (0 if none).
  """
  b, l, h, d = q.shape
  if idx.ndim != 4 or idx.shape[:2] != (b, h):
    raise ValueError(f"idx must be [batch={b}, heads={h}, clusters, window],"
                     f" got {idx.shape}")
  c, w = idx.shape[2:]
  check_window(w, l, c)
  if impl == "reference":
    from sparsejax.learned import reference  # pylint: disable=g-import-not-at-top
    return reference.routing_attention_reference(
        q, k, v, members_to_bool(idx, l), causal=causal, scale=scale)
  qg, kg, vg = _gather(q, idx, h), _gather(k, idx, h), _gather(v, idx, h)
  mask = cluster_mask(c, w, causal) if mask is None else mask
  og = _attention(qg, kg, vg, mask, scale=scale, impl=impl,
                  interpret=interpret)  # [B, C * W, H, D]
  flat = idx.reshape(b, h, -1)
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(h)[None, :, None]
  total = jnp.zeros((b, l, h, d), jnp.float32).at[bi, flat, hi].add(
      jnp.swapaxes(og, 1, 2).astype(jnp.float32))
  count = jnp.zeros((b, l, h), jnp.float32).at[bi, flat, hi].add(1.0)
  return (total / jnp.maximum(count, 1.0)[..., None]).astype(q.dtype)


def kmeans_ema_update(x_norm, ema_sum, ema_count, *, decay: float = 0.999,
                      eps: float = 1e-5):
  """One online mini-batch k-means step (VQ-VAE-style EMA).

  Args:
    x_norm: routing vectors [B, L, H, D] (stop-gradient'ed here).
    ema_sum: [H, C, D] EMA of the per-cluster sums of assigned vectors.
    ema_count: [H, C] EMA of the per-cluster counts.
    decay: EMA decay (the paper: 0.999).
    eps: Laplace smoothing of the counts.

  Returns:
    (centroids [H, C, D], ema_sum, ema_count), all f32. Assignment is the
    largest dot product with the current centroids ema_sum / ema_count.
  """
  x = jax.lax.stop_gradient(x_norm).astype(jnp.float32)
  c = ema_count.shape[-1]
  means = centroids_from(ema_sum, ema_count, eps)
  assign = jnp.einsum("blhd,hcd->blhc", x, means).argmax(-1)
  onehot = jax.nn.one_hot(assign, c, dtype=jnp.float32)  # [B, L, H, C]
  count = onehot.sum((0, 1))  # [H, C]
  sums = jnp.einsum("blhc,blhd->hcd", onehot, x)
  ema_count = decay * ema_count + (1.0 - decay) * count
  ema_sum = decay * ema_sum + (1.0 - decay) * sums
  return centroids_from(ema_sum, ema_count, eps), ema_sum, ema_count


def centroids_from(ema_sum, ema_count, eps: float = 1e-5):
  """ema_sum / Laplace-smoothed ema_count."""
  n = ema_count.sum(-1, keepdims=True)
  smoothed = (ema_count + eps) / (n + ema_count.shape[-1] * eps) * n
  return ema_sum / smoothed[..., None]


def commitment_loss(x_norm, centroids):
  """mean ||x - sg(nearest centroid)||^2 / D: pulls vectors to centroids."""
  x = x_norm.astype(jnp.float32)
  mu = jax.lax.stop_gradient(centroids.astype(jnp.float32))
  assign = jnp.einsum("blhd,hcd->blhc", jax.lax.stop_gradient(x),
                      mu).argmax(-1)  # [B, L, H]
  nearest = mu[jnp.arange(mu.shape[0]), assign]  # [B, L, H, D]
  return jnp.square(x - nearest).mean()
