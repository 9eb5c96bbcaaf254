"""Shapes and masks that every implementation is checked on."""

import dataclasses
from typing import Callable, Optional

import jax.numpy as jnp

import sparsejax as sj


@dataclasses.dataclass(frozen=True)
class RowsOff:
  """Kills every `period`-th query row: fully masked rows inside live blocks."""
  period: int = 5

  def __call__(self, b, h, q, kv):
    return (q % self.period != 0) & (kv <= q)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  batch: int
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  head_dim: int
  make_mask: Callable[[], Optional[sj.BlockMask]]
  soft_cap: Optional[float] = None


def empty_row_blocks(block=32, length=120):
  # Block row 1 lists nothing at all; the others are causal-ish.
  blocks = jnp.tril(jnp.ones((4, 4), bool)).at[1].set(False)
  return sj.masks.from_block_mask(blocks, block_size=block, q_len=length,
                                  kv_len=length, mask_fn=sj.mask_fns.Causal())


CASES = [
    Case("dense_none", 1, 96, 96, 2, 2, 32, lambda: None),
    Case("causal_ragged_gqa_d48", 2, 100, 100, 4, 2, 48,
         lambda: sj.masks.causal(100, block_size=32)),
    Case("sliding_mqa_softcap", 1, 128, 128, 4, 1, 64,
         lambda: sj.masks.sliding_window(128, 40, block_size=32), 5.0),
    Case("s2_gqa", 1, 160, 160, 4, 2, 32,
         lambda: sj.masks.s2(160, 4, block_size=16, local_blocks=2,
                             vert_stride=3, num_kv_heads=2)),
    Case("cross_random_per_batch_head", 2, 64, 144, 2, 2, 32,
         lambda: sj.masks.from_mask_fn(sj.mask_fns.HashedRandom(3, 2, 3),
                                       q_len=64, kv_len=144, batch=2,
                                       num_heads=2, block_size=32)),
    Case("fully_masked_rows", 1, 120, 120, 2, 1, 32,
         lambda: sj.masks.from_mask_fn(RowsOff(), q_len=120, block_size=32)),
    Case("empty_block_row", 1, 120, 120, 2, 2, 32, empty_row_blocks),
    Case("and_or_combination", 1, 128, 128, 2, 2, 32,
         lambda: (sj.masks.sliding_window(128, 20, block_size=32)
                  | sj.masks.s2(128, 2, block_size=32, local_blocks=1,
                                vert_stride=2))
         & sj.masks.causal(128, block_size=32)),
]
CASES_BY_NAME = {c.name: c for c in CASES}
