"""The S2 pattern's static parameters, as the KV cache and decode see them.

Same semantics as `sj.masks.s2` / `sj.mask_fns.S2` (causal, absolute
positions): kv block j of kv head g is visible to query block i iff j <= i and
((i - j) < local_blocks or (j + g * step + offset) % vert_stride == 0); the last
`num_dense_heads` kv heads see everything. Sparse kv head g therefore keeps the
blocks of one residue class r_g forever, and everything else only while it is
in its local window (DKernel's "KV-cache-efficient" property).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from sparsejax.block_sparse import masks
from sparsejax.block_sparse.masks import _check_len  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class S2Pattern:
  """Static, hashable S2 parameters (a jit-static field of the cache)."""
  block_size: int = 64
  local_blocks: int = 16
  vert_stride: int = 8
  num_heads: int = 32
  num_kv_heads: int = 8
  num_dense_heads: int = 0
  head_sliding_offset: int = 0
  head_sliding_step: Optional[int] = None
  homo_head: bool = False

  def __post_init__(self):
    # The same checks (and step rule) as sj.masks.s2, from one place.
    _check_len(self.num_heads, "num_heads")
    object.__setattr__(self, "_step", masks.check_s2_params(
        self.num_heads, block_size=self.block_size,
        local_blocks=self.local_blocks, vert_stride=self.vert_stride,
        num_kv_heads=self.num_kv_heads, homo_head=self.homo_head,
        num_dense_heads=self.num_dense_heads,
        head_sliding_step=self.head_sliding_step))

  @property
  def step(self) -> int:
    return self._step  # pylint: disable=no-member

  @property
  def group(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def num_sparse_heads(self) -> int:
    return self.num_kv_heads - self.num_dense_heads

  def residue(self, g: int) -> int:
    """The strided blocks of sparse kv head g are j = residue(g) + t*stride."""
    g = 0 if self.homo_head else g
    return (-g * self.step - self.head_sliding_offset) % self.vert_stride

  def mask(self, seq_len: int):
    """The prefill BlockMask with identical semantics (for references)."""
    return masks.s2(seq_len, self.num_heads, block_size=self.block_size,
                    local_blocks=self.local_blocks,
                    vert_stride=self.vert_stride,
                    num_kv_heads=self.num_kv_heads, homo_head=self.homo_head,
                    num_dense_heads=self.num_dense_heads,
                    head_sliding_offset=self.head_sliding_offset,
                    head_sliding_step=self.head_sliding_step)


def phi3_small(num_dense_heads: int = 0) -> S2Pattern:
  """Phi-3-small's blocksparse layers (vLLM convention: offset 1)."""
  return S2Pattern(block_size=64, local_blocks=16, vert_stride=8,
                   num_heads=32, num_kv_heads=8,
                   num_dense_heads=num_dense_heads, head_sliding_offset=1)
