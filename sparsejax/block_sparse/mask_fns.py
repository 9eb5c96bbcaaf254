"""Element-level mask functions: `fn(b, h, q_idx, kv_idx) -> bool`.

They are frozen dataclasses (hashable by value, so equal masks share one jit
cache entry) made of index arithmetic only, so Pallas kernels can evaluate
them in registers on partial blocks. Arguments broadcast against each other.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Causal:
  """q attends kv iff kv <= q + offset (top-left aligned when offset is 0)."""
  offset: int = 0

  def __call__(self, b, h, q, kv):
    del b, h
    return kv <= q + self.offset


@dataclasses.dataclass(frozen=True)
class SlidingWindow:
  """Causal: 0 <= q - kv < window. Bidirectional: |q - kv| < window."""
  window: int
  causal: bool = True

  def __call__(self, b, h, q, kv):
    del b, h
    d = q - kv
    if self.causal:
      return (d >= 0) & (d < self.window)
    return (d < self.window) & (d > -self.window)


@dataclasses.dataclass(frozen=True)
class Band:
  """lo <= q - kv <= hi; None leaves that side open (jax.nn's
  local_window_size=(left, right) is Band(-right, left))."""
  lo: Optional[int]
  hi: Optional[int]

  def __call__(self, b, h, q, kv):
    del b, h
    d = q - kv
    out = True
    if self.lo is not None:
      out = d >= self.lo
    if self.hi is not None:
      out = (d <= self.hi) if self.lo is None else out & (d <= self.hi)
    return out


@dataclasses.dataclass(frozen=True)
class S2:
  """DKernel's local-stride pattern, exact at element level.

  Block (i, j) of kv head g is attended iff it is within the local window or
  (j + g * step + offset) % vert_stride == 0 (causal, absolute positions); the
  last `num_dense_heads` kv heads attend everything. Query head h belongs to
  kv head h // group. Bidirectional uses DKernel's relative rule.
  """
  block_size: int
  local_blocks: Any  # int, or (left, right) when bidirectional
  vert_stride: int
  step: int
  offset: int
  group: int
  num_kv_heads: int
  num_dense_heads: int
  homo_head: bool
  causal: bool

  def block_visible(self, h, qb, kb):
    g = jnp.zeros_like(h) if self.homo_head else h // self.group
    if self.causal:
      local = (qb - kb) < self.local_blocks
      vert = (kb + g * self.step + self.offset) % self.vert_stride == 0
      sparse = local | vert
    else:
      left, right = _left_right(self.local_blocks)
      d = (jnp.maximum(0, (qb - kb) - left + 1) +
           jnp.maximum(0, (kb - qb) - right + 1))
      sparse = d % self.vert_stride == 0
    dense = g >= self.num_kv_heads - self.num_dense_heads
    return dense | sparse

  def __call__(self, b, h, q, kv):
    del b
    vis = self.block_visible(h, q // self.block_size, kv // self.block_size)
    return (vis & (kv <= q)) if self.causal else vis


def _left_right(local_blocks) -> Tuple[int, int]:
  if isinstance(local_blocks, (tuple, list)):
    return int(local_blocks[0]), int(local_blocks[1])
  return int(local_blocks), int(local_blocks)


@dataclasses.dataclass(frozen=True)
class HashedRandom:
  """A pseudo-random element mask from integer hashing; density ~ keep/modulus.

  For tests: random-looking patterns that a kernel can still evaluate.
  """
  seed: int
  keep: int = 1
  modulus: int = 2

  def __call__(self, b, h, q, kv):
    x = (q * 73 + kv * 151 + h * 29 + b * 17 + self.seed * 7) % 997
    x = (x * 389 + 11) % 997
    return (x % self.modulus) < self.keep


@dataclasses.dataclass(frozen=True)
class And:
  fns: Tuple[Any, ...]

  def __call__(self, b, h, q, kv):
    out = self.fns[0](b, h, q, kv)
    for f in self.fns[1:]:
      out = out & f(b, h, q, kv)
    return out


@dataclasses.dataclass(frozen=True)
class Or:
  fns: Tuple[Any, ...]

  def __call__(self, b, h, q, kv):
    out = self.fns[0](b, h, q, kv)
    for f in self.fns[1:]:
      out = out | f(b, h, q, kv)
    return out


def logical_and(f: Optional[Any], g: Optional[Any]):
  """AND of element masks; None means no element constraint (all True)."""
  if f is None or g is None:
    return g if f is None else f
  return And((f, g))


def logical_or(f: Optional[Any], g: Optional[Any]):
  """OR of element masks; None (a mask of full blocks only) adds nothing."""
  if f is None or g is None:
    return g if f is None else f
  return Or((f, g))
