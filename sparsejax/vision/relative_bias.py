"""2-D relative-position bias tables (MaxViT / TF layout) as dense tiles.

The table `[heads, 2*P1-1, 2*P2-1]` is google-research/maxvit's
`relative_bias` ('2d_multi_head'): for query (i, j) and key (x, y) in window
coordinates the bias is `table[n, x - i + P1 - 1, y - j + P2 - 1]` (key minus
query). Its checkpoints load unchanged. The gather to `[heads, T, T]`
(T = P1*P2, tiny) is TF's one-hot einsum (`reindex_2d_einsum_lookup`), so its
transpose, the table gradient, is an einsum too: deterministic on every
backend (no scatter-add).
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _one_hot_offsets(p: int) -> np.ndarray:
  """L[i, x, v] = 1{x - i + p - 1 == v}: [p, p, 2p - 1] f32."""
  i = np.arange(p)[:, None, None]
  x = np.arange(p)[None, :, None]
  v = np.arange(2 * p - 1)[None, None, :]
  return (x - i + p - 1 == v).astype(np.float32)


def check_table(table, heads, window: Tuple[int, int], name="rel_bias"):
  """ValueError unless table is [heads|1, 2*P1-1, 2*P2-1]."""
  want = (2 * window[0] - 1, 2 * window[1] - 1)
  shape = getattr(table, "shape", None)
  if shape is None or len(shape) != 3 or tuple(shape[1:]) != want or (
      shape[0] not in (1, heads)):
    raise ValueError(f"{name} must be [heads={heads} (or 1), {want[0]}, "
                     f"{want[1]}] for window {window}, got {shape}")


def bias_matrix(table: jax.Array, window: Tuple[int, int]) -> jax.Array:
  """[H, 2P1-1, 2P2-1] -> [H, T, T] f32 with T = P1*P2 (row-major positions)."""
  p1, p2 = window
  l1, l2 = jnp.asarray(_one_hot_offsets(p1)), jnp.asarray(_one_hot_offsets(p2))
  out = jnp.einsum("nab,ixa,jyb->nijxy", table.astype(jnp.float32), l1, l2,
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(table.shape[0], p1 * p2, p1 * p2)


def from_timm(table: jax.Array, window: Tuple[int, int]) -> jax.Array:
  """timm `RelPosBias` flat table [(2P1-1)(2P2-1), heads] -> TF layout.

  timm indexes by query minus key (row-major over (dh, dw) + (P-1)), so the
  TF table is its flip along both offset axes.
  """
  p1, p2 = window
  t = jnp.asarray(table).reshape(2 * p1 - 1, 2 * p2 - 1, -1)
  return jnp.transpose(t[::-1, ::-1], (2, 0, 1))


def resize(table: jax.Array, window: Tuple[int, int]) -> jax.Array:
  """Bilinear resize of a table to a new window (MaxViT fine-tuning at
  another resolution, as TF's tf.image.resize of the table)."""
  h = table.shape[0]
  return jax.image.resize(table, (h, 2 * window[0] - 1, 2 * window[1] - 1),
                          "bilinear")
