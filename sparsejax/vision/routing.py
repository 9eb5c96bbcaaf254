"""BiFormer bi-level routing: region means, affinity, top-k, a traced BlockMask.

Following BiFormer's `nchwBRA` (ops/bra_nchw.py): the map is cut into
S x S regions of (X/S, Y/S) tokens; region means of q and k over ALL heads'
channels (no gradient: BiFormer routes on detached q, k), affinity
a_r = q_r k_r^T [S^2, S^2], and the top-k regions per query region form ONE
route table per image, shared by every head. Tokens are then put in
region-major order (`permute.window_partition` with the region shape), so a
query region is a q block and its routed regions are its kv blocks: a
BlockMask built under jit, and memory stays O(N d) (no k-fold gather).

Regions smaller than the kernels' minimum block (16 tokens; BiFormer's 14x14
stage has 2x2 regions) are zero-padded to the block and the padded keys are
masked (`RegionPad`).
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp

from sparsejax.block_sparse.block_mask import (BlockMask, EMPTY, FULL,
                                               PARTIAL, next_power_of_2)
from sparsejax.vision import permute

MIN_BLOCK = 16


def region_shape(map_shape, num_regions: int) -> Tuple[int, int]:
  """(X/S, Y/S); ValueError unless S divides both sides."""
  x, y = map_shape
  if not isinstance(num_regions, int) or num_regions < 1 or (
      x % num_regions or y % num_regions):
    raise ValueError(f"num_regions must be a positive int dividing the map "
                     f"{(x, y)}, got {num_regions!r}")
  return x // num_regions, y // num_regions


def check_topk(topk, num_regions: int) -> int:
  n = num_regions * num_regions
  if not isinstance(topk, int) or not 1 <= topk <= n:
    raise ValueError(f"topk must be an int in [1, num_regions**2 = {n}], got "
                     f"{topk!r}")
  return topk


def route(q, k, num_regions: int, topk: int):
  """int32 [B, S^2, topk]: the routed kv regions of each query region.

  q, k: [B, X, Y, H, D]. Region means over all H * D channels, in f32, with
  the gradient stopped (BiFormer's detached routing).
  """
  region = region_shape(q.shape[1:3], num_regions)
  b = q.shape[0]

  def means(x):
    x = permute.window_partition(jax.lax.stop_gradient(x), region)
    return x.astype(jnp.float32).mean(2).reshape(b, num_regions ** 2, -1)

  affinity = jnp.einsum("bic,bjc->bij", means(q), means(k),
                        precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(affinity, topk)[1].astype(jnp.int32)


def routed_blocks(idx, num_regions: int):
  """bool [B, S^2, S^2]: query region i attends kv region j."""
  n = num_regions * num_regions
  return jax.nn.one_hot(idx, n, dtype=jnp.bool_).any(-2)


@dataclasses.dataclass(frozen=True)
class RegionPad:
  """Keys at in-region position >= `tokens` are padding (blocks of `block`)."""
  tokens: int
  block: int

  def __call__(self, b, h, q, kv):
    del b, h, q
    return jax.lax.rem(kv, jnp.int32(self.block)) < self.tokens


def block_size(region_tokens: int) -> int:
  """The kernels' block for regions of this many tokens (power of 2, >= 16)."""
  return max(MIN_BLOCK, next_power_of_2(region_tokens))


def routing_block_mask(idx, num_regions: int, region_tokens: int
                       ) -> BlockMask:
  """The traced BlockMask [B, 1, S^2, S^2] of a route table (jit-friendly)."""
  n = num_regions * num_regions
  bs = block_size(region_tokens)
  blocks = routed_blocks(idx, num_regions)
  padded = bs != region_tokens
  states = jnp.where(blocks, PARTIAL if padded else FULL, EMPTY).astype(
      jnp.int8)[:, None]
  return BlockMask.from_states(
      states, block_q=bs, block_kv=bs, q_len=n * bs, kv_len=n * bs,
      mask_fn=RegionPad(region_tokens, bs) if padded else None)


def to_regions(x, region, block: int):
  """[B, X, Y, H, D] -> [B, S^2 * block, H, D] region-major, zero-padded."""
  x = permute.window_partition(x, region)  # [B, S^2, r, H, D]
  pad = block - x.shape[2]
  if pad:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0)))
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def from_regions(x, region, block: int, map_shape):
  """Inverse of `to_regions`."""
  b = x.shape[0]
  n = (map_shape[0] // region[0]) * (map_shape[1] // region[1])
  x = x.reshape(b, n, block, *x.shape[2:])[:, :, :region[0] * region[1]]
  return permute.window_unpartition(x, region, map_shape)
