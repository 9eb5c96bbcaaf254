"""Shapes and masks that every implementation is checked on."""

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

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
  # key -> a score mod with random parameters, or None.
  make_mod: Optional[Callable[[Any], Any]] = None
  # () -> (q ids [B, Lq], kv ids [B, Lk]) numpy int32, or None.
  make_segments: Optional[Callable[[], Any]] = None


@dataclasses.dataclass(frozen=True)
class Temperature(sj.score_mods.ScoreMod):
  """A user-written, non-additive mod: score * temp[h] (d/d score = temp[h],
  so the backward takes the jvp path), with its own kernel statistics."""
  temp: Any

  def __call__(self, score, b, h, q_idx, kv_idx):
    return score * self.temp[h]

  @property
  def num_stats(self):
    return 1

  def tile_stats(self, g, score, b, h, q_idx, kv_idx, width):
    return sj.score_mods.bucket(width, 0, jnp.sum(g * score))

  def stats_to_grads(self, stats):
    return (stats[..., 0].sum(0),)


def packed_ids(batch_docs, length, pad=None):
  """[B, length] int32 ids from per-example document lengths (then `pad`)."""
  rows = []
  for docs in batch_docs:
    ids = np.concatenate([np.full(n, i, np.int32) for i, n in
                          enumerate(docs)])
    rows.append(np.concatenate([ids, np.full(length - ids.size, pad,
                                             np.int32)]))
  return np.stack(rows)


def _padded_segments():
  # Example 0: three documents and 5 padding tokens (q pad -1, kv pad -2:
  # fully masked query rows); example 1: two documents, no padding.
  q = packed_ids([(13, 22, 10), (30, 20)], 50, pad=-1)
  kv = np.where(q == -1, -2, q)
  return q, kv


def _two_docs(length, split):
  ids = packed_ids([(split, length - split)], length)
  return ids, ids


def _cross_segments():
  # q and kv lengths differ; blocks holding one id, two ids and no match.
  return (packed_ids([(10, 17, 13)], 40),
          packed_ids([(20, 6, 30)], 56))


def _uniform(lo, hi, shape):
  return lambda key: jax.random.uniform(key, shape, jnp.float32, lo, hi)


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

# Score mods and segment ids (float64-checked like the rest, tiny shapes).
MOD_CASES = [
    Case("segments_causal_gqa_padding", 2, 50, 50, 4, 2, 16,
         lambda: sj.masks.causal(50, block_size=16),
         make_segments=_padded_segments),
    Case("alibi_softcap_causal_mqa", 1, 45, 45, 2, 1, 16,
         lambda: sj.masks.causal(45, block_size=16), 5.0,
         make_mod=lambda key: sj.score_mods.Alibi(
             _uniform(0.05, 0.5, (2,))(key))),
    Case("relative_bias_s2_segments", 1, 64, 64, 2, 2, 16,
         lambda: sj.masks.s2(64, 2, block_size=16, local_blocks=2,
                             vert_stride=2),
         make_mod=lambda key: sj.score_mods.RelativeBias(
             jax.random.normal(key, (2, 9))),
         make_segments=lambda: _two_docs(64, 37)),
    Case("user_mod_cross_segments", 1, 40, 56, 2, 2, 16, lambda: None,
         make_mod=lambda key: Temperature(_uniform(0.5, 2.0, (2,))(key)),
         make_segments=_cross_segments),
]
CASES_BY_NAME = {c.name: c for c in CASES + MOD_CASES}
