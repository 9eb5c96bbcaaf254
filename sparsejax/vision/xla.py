"""impl="xla" paths of the vision ops in plain jnp (any backend).

Window attention (MaxViT block / grid): partition, per-window dense
attention in f32 with the bias tile added, unpartition. Memory is
O(N * T) for windows of T tokens: never L x L. Autodiff gives the backward
(the bias gradient is the transpose of `relative_bias.bias_matrix`'s einsum:
deterministic).

Neighborhood and routing attention run through the block-sparse core's xla
path (implementations.py), O(N d) with or without the relative bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.vision import permute

_PARTITION = {
    "block": (permute.window_partition, permute.window_unpartition),
    "grid": (permute.grid_partition, permute.grid_unpartition),
}


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def window_attention(q, k, v, layout: permute.WindowLayout, bias, scale):
  """q, k, v: [B, X, Y, H, D] (block/grid) or [B, nW, T, H, D]; bias
  [H|1, T, T] f32 or None. Returns the output in q's layout and dtype."""
  if layout.kind != "contiguous":
    part, unpart = _PARTITION[layout.kind]
    q, k, v = (part(x, layout.window) for x in (q, k, v))
  prec = _precision(q.dtype)
  s = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k, precision=prec,
                 preferred_element_type=jnp.float32) * scale
  if bias is not None:
    s = s + bias
  p = jax.nn.softmax(s, axis=-1)
  out = jnp.einsum("bwhqk,bwkhd->bwqhd", p.astype(v.dtype), v, precision=prec,
                   preferred_element_type=jnp.float32).astype(q.dtype)
  if layout.kind != "contiguous":
    out = unpart(out, layout.window, layout.map_shape)
  return out
