"""Mask constructors: each returns a `BlockMask` (see block_mask.py).

Block states are derived analytically for the structured masks (causal,
sliding window, S2) and by chunked per-block evaluation for arbitrary mask
functions, so no constructor materialises the q_len x kv_len matrix.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.block_sparse import mask_fns
from sparsejax.block_sparse.block_mask import BlockMask, EMPTY, FULL, PARTIAL

BlockSize = Union[int, Tuple[int, int]]


def _check_block_size(block_size: BlockSize, name="block_size"):
  bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
  for b in (bq, bk):
    if not isinstance(b, (int, np.integer)) or b < 16 or b & (b - 1):
      raise ValueError(f"{name} must be a power of two >= 16, got {block_size}")
  return int(bq), int(bk)


def _check_len(value, name):
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def _block_ranges(length: int, block: int):
  """First and last index of each block, clipped to the length."""
  n = -(-length // block)
  first = jnp.arange(n) * block
  last = jnp.minimum(first + block, length) - 1
  return first, last


def _band_states(q_len, kv_len, bq, bk, lo, hi):
  """States of the mask lo <= q - kv <= hi (None: unbounded), [1,1,nq,nk]."""
  qf, ql = _block_ranges(q_len, bq)
  kf, kl = _block_ranges(kv_len, bk)
  dmin = qf[:, None] - kl[None, :]
  dmax = ql[:, None] - kf[None, :]
  full = jnp.ones(dmin.shape, bool)
  empty = jnp.zeros(dmin.shape, bool)
  if lo is not None:
    full &= dmin >= lo
    empty |= dmax < lo
  if hi is not None:
    full &= dmax <= hi
    empty |= dmin > hi
  states = jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL))
  return states.astype(jnp.int8)[None, None]


def full(q_len: int, kv_len: Optional[int] = None, *,
         block_size: BlockSize = 128) -> BlockMask:
  """Every query sees every key (dense, bidirectional)."""
  q_len = _check_len(q_len, "q_len")
  kv_len = q_len if kv_len is None else _check_len(kv_len, "kv_len")
  bq, bk = _check_block_size(block_size)
  return BlockMask.from_states(_band_states(q_len, kv_len, bq, bk, None, None),
                               block_q=bq, block_kv=bk, q_len=q_len,
                               kv_len=kv_len)


def causal(q_len: int, kv_len: Optional[int] = None, *,
           block_size: BlockSize = 128, offset: int = 0) -> BlockMask:
  """Query q sees keys kv <= q + offset (top-left aligned at offset 0)."""
  q_len = _check_len(q_len, "q_len")
  kv_len = q_len if kv_len is None else _check_len(kv_len, "kv_len")
  bq, bk = _check_block_size(block_size)
  return BlockMask.from_states(
      _band_states(q_len, kv_len, bq, bk, -offset, None), block_q=bq,
      block_kv=bk, q_len=q_len, kv_len=kv_len,
      mask_fn=mask_fns.Causal(offset))


def sliding_window(q_len: int, window: int, *, causal: bool = True,  # pylint: disable=redefined-outer-name
                   kv_len: Optional[int] = None,
                   block_size: BlockSize = 128) -> BlockMask:
  """Each query sees the `window` most recent keys, itself included.

  Causal: 0 <= q - kv < window (cuDNN's local_window_size=(window-1, 0)).
  Bidirectional: |q - kv| < window.
  """
  q_len = _check_len(q_len, "q_len")
  window = _check_len(window, "window")
  kv_len = q_len if kv_len is None else _check_len(kv_len, "kv_len")
  bq, bk = _check_block_size(block_size)
  lo = 0 if causal else -(window - 1)
  states = _band_states(q_len, kv_len, bq, bk, lo, window - 1)
  return BlockMask.from_states(states, block_q=bq, block_kv=bk, q_len=q_len,
                               kv_len=kv_len,
                               mask_fn=mask_fns.SlidingWindow(window, causal))


def band(q_len: int, kv_len: Optional[int] = None, *, lo: Optional[int],
         hi: Optional[int], block_size: BlockSize = 128) -> BlockMask:
  """Query q sees keys with lo <= q - kv <= hi (None: unbounded side).

  causal is band(lo=0, hi=None); jax.nn's local_window_size=(left, right) is
  band(lo=-right, hi=left).
  """
  q_len = _check_len(q_len, "q_len")
  kv_len = q_len if kv_len is None else _check_len(kv_len, "kv_len")
  bq, bk = _check_block_size(block_size)
  for name, x in (("lo", lo), ("hi", hi)):
    if x is not None and not isinstance(x, (int, np.integer)):
      raise TypeError(f"{name} must be an int or None, got {x!r}")
  fn = None if lo is None and hi is None else mask_fns.Band(
      None if lo is None else int(lo), None if hi is None else int(hi))
  return BlockMask.from_states(_band_states(q_len, kv_len, bq, bk, lo, hi),
                               block_q=bq, block_kv=bk, q_len=q_len,
                               kv_len=kv_len, mask_fn=fn)


def s2(seq_len: int, num_heads: int, *, block_size: int = 64,
       local_blocks: Union[int, Tuple[int, int]] = 16, vert_stride: int = 8,
       num_kv_heads: Optional[int] = None, homo_head: bool = False,
       num_dense_heads: int = 0, head_sliding_offset: int = 0,
       head_sliding_step: Optional[int] = None,
       causal: bool = True) -> BlockMask:  # pylint: disable=redefined-outer-name
  """S2-Attention's local-stride pattern, with DKernel's semantics.

  Kv head g attends, outside its local window of `local_blocks` blocks (the
  diagonal block included), the blocks j with
  (j + g * step + head_sliding_offset) % vert_stride == 0, where
  step = head_sliding_step or max(1, vert_stride // num_heads). The q heads of
  one kv head share its pattern (GQA); the last `num_dense_heads` kv heads are
  dense; `homo_head` gives every head the same pattern. head_sliding_offset=1
  reproduces vLLM's and Phi-3-small's convention. Bidirectional masks use
  DKernel's relative rule (local_blocks may be a (left, right) pair).
  """
  seq_len = _check_len(seq_len, "seq_len")
  num_heads = _check_len(num_heads, "num_heads")
  bs, _ = _check_block_size(block_size)
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  step = check_s2_params(num_heads, block_size=bs, local_blocks=local_blocks,
                         vert_stride=vert_stride, num_kv_heads=num_kv_heads,
                         homo_head=homo_head, num_dense_heads=num_dense_heads,
                         head_sliding_step=head_sliding_step, causal=causal)
  locals_ = local_blocks if isinstance(local_blocks, (tuple, list)) else (
      local_blocks,)
  group = num_heads // num_kv_heads
  fn = mask_fns.S2(bs, tuple(local_blocks) if len(locals_) > 1 else
                   int(local_blocks), int(vert_stride), int(step),
                   int(head_sliding_offset), group, num_kv_heads,
                   num_dense_heads, bool(homo_head), bool(causal))
  n = -(-seq_len // bs)
  pattern_heads = 1 if homo_head else num_kv_heads
  g = jnp.arange(pattern_heads)[:, None, None]
  i = jnp.arange(n)[None, :, None]
  j = jnp.arange(n)[None, None, :]
  # fn.block_visible takes q heads; the first q head of kv head g is g*group.
  vis = fn.block_visible(g * group, i, j)
  if causal:
    vis &= i >= j
    states = jnp.where(vis, jnp.where(i == j, PARTIAL, FULL), EMPTY)
  else:
    states = jnp.where(vis, FULL, EMPTY)
  if causal and not homo_head and not num_dense_heads:
    _warn_on_gaps(np.asarray(states != EMPTY))
  mask = BlockMask.from_states(states.astype(jnp.int8)[None], block_q=bs,
                               block_kv=bs, q_len=seq_len, kv_len=seq_len,
                               mask_fn=fn if causal else None,
                               # partial blocks are the diagonal ones, where
                               # the S2 rule reduces to plain causal
                               partial_fn=mask_fns.Causal() if causal else None)
  if pattern_heads > 1 and group > 1:  # q heads of a group share the lists
    mask = jax.tree.map(lambda x: jnp.repeat(x, group, axis=1), mask)
  return mask


def check_s2_params(num_heads: int, *, block_size, local_blocks, vert_stride,
                    num_kv_heads, homo_head=False, num_dense_heads=0,
                    head_sliding_step=None, causal=True) -> int:
  """Validates S2 parameters (ValueError naming the contradiction) and returns
  the per-head step: head_sliding_step or max(1, vert_stride // num_heads)."""
  _check_block_size(block_size)
  _check_len(num_kv_heads, "num_kv_heads")
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads ({num_heads}) must be divisible by "
                     f"num_kv_heads ({num_kv_heads})")
  if not isinstance(vert_stride, (int, np.integer)) or vert_stride < 1:
    raise ValueError(f"vert_stride must be an int >= 1, got {vert_stride!r}")
  pair = isinstance(local_blocks, (tuple, list))
  if causal and pair:
    raise ValueError("local_blocks must be an int when causal=True, got "
                     f"{local_blocks!r}")
  if any(not isinstance(x, (int, np.integer)) or x < 1
         for x in (local_blocks if pair else (local_blocks,))):
    raise ValueError(f"local_blocks must be >= 1, got {local_blocks!r}")
  if not 0 <= num_dense_heads <= num_kv_heads:
    raise ValueError(f"num_dense_heads must be in [0, num_kv_heads="
                     f"{num_kv_heads}], got {num_dense_heads}")
  if homo_head and num_dense_heads:
    raise ValueError("homo_head=True cannot be combined with num_dense_heads")
  if head_sliding_step is not None:
    return int(head_sliding_step)
  return max(1, vert_stride // num_heads)


def s2_coverage(mask: BlockMask) -> dict:
  """Per-head density (vs causal) and whether the union of the heads covers
  every past block."""
  return _coverage(np.asarray(mask.block_states())[0] != EMPTY)


def _coverage(visible: np.ndarray) -> dict:
  """visible: bool [H, nq, nk] block pattern of a causal mask."""
  nq = visible.shape[1]
  density = visible.sum((1, 2)) / (nq * (nq + 1) / 2)
  gaps = int((np.tril(np.ones(visible.shape[1:], bool)) &
              ~visible.any(0)).sum())
  return {"density_per_head": density.tolist(), "covers_all": gaps == 0,
          "uncovered_blocks": gaps}


def _warn_on_gaps(visible: np.ndarray) -> None:
  report = _coverage(visible)
  if not report["covers_all"]:
    logging.warning(
        "S2 pattern: the union of the %d kv-head patterns leaves %d past "
        "blocks unattended (fewer heads than vert_stride?); queries see only "
        "their local window there.", visible.shape[0],
        report["uncovered_blocks"])


# --- arbitrary masks --------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("mask_fn", "batch", "heads",
                                             "q_len", "kv_len", "bq", "bk",
                                             "chunk"))
def _eval_states(mask_fn, batch, heads, q_len, kv_len, bq, bk, chunk):
  """Block states of mask_fn, evaluated `chunk` q blocks at a time."""
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  n_chunks = -(-nq // chunk)
  b = jnp.arange(batch)[:, None, None, None]
  h = jnp.arange(heads)[None, :, None, None]
  kv = jnp.arange(nk * bk)[None, None, None, :]

  def one_chunk(c):
    q = (c * chunk * bq + jnp.arange(chunk * bq))[None, None, :, None]
    vis = jnp.broadcast_to(mask_fn(b, h, q, kv), (batch, heads, chunk * bq,
                                                  nk * bk))
    in_range = (q < q_len) & (kv < kv_len)
    vis = vis.reshape(batch, heads, chunk, bq, nk, bk)
    rng = jnp.broadcast_to(in_range, vis.shape[:2] + in_range.shape[2:]
                           ).reshape(vis.shape)
    any_ = (vis & rng).any((3, 5))
    all_ = (vis | ~rng).all((3, 5))
    return jnp.where(all_, FULL, jnp.where(any_, PARTIAL, EMPTY)).astype(
        jnp.int8)

  states = jax.lax.map(one_chunk, jnp.arange(n_chunks))  # [C, B, H, chunk, nk]
  states = jnp.moveaxis(states, 0, 2).reshape(batch, heads, n_chunks * chunk,
                                              nk)
  return states[:, :, :nq]


def _states_from_fn(mask_fn, batch, heads, q_len, kv_len, bq, bk):
  per_row = batch * heads * bq * (-(-kv_len // bk) * bk)
  chunk = max(1, min(-(-q_len // bq), (1 << 24) // max(per_row, 1)))
  return _eval_states(mask_fn, batch, heads, q_len, kv_len, bq, bk, chunk)


def from_mask_fn(mask_fn, *, q_len: int, kv_len: Optional[int] = None,
                 batch: int = 1, num_heads: int = 1,
                 block_size: BlockSize = 128) -> BlockMask:
  """A BlockMask from `mask_fn(b, h, q_idx, kv_idx) -> bool` (jnp arithmetic).

  Blocks are classified by evaluating the function one chunk of query blocks
  at a time: memory stays O(chunk x kv_len), never q_len x kv_len. The
  function must be hashable (a frozen dataclass or a module-level function)
  and is evaluated again inside kernels on partial blocks.
  """
  if not callable(mask_fn):
    raise TypeError(f"mask_fn must be callable, got {type(mask_fn).__name__}")
  q_len = _check_len(q_len, "q_len")
  kv_len = q_len if kv_len is None else _check_len(kv_len, "kv_len")
  batch = _check_len(batch, "batch")
  num_heads = _check_len(num_heads, "num_heads")
  bq, bk = _check_block_size(block_size)
  states = _states_from_fn(mask_fn, batch, num_heads, q_len, kv_len, bq, bk)
  return BlockMask.from_states(states, block_q=bq, block_kv=bk, q_len=q_len,
                               kv_len=kv_len, mask_fn=mask_fn)


def from_block_mask(blocks, *, block_size: BlockSize,
                    q_len: Optional[int] = None, kv_len: Optional[int] = None,
                    mask_fn=None) -> BlockMask:
  """A BlockMask from a bool block pattern [B|1, H|1, nq, nk] (or [nq, nk]).

  Works on traced arrays under jit (data-dependent sparsity). Listed blocks
  are full; with `mask_fn`, the element mask is blocks AND mask_fn, and the
  listed blocks are classified full/partial/empty by evaluating mask_fn.
  """
  bq, bk = _check_block_size(block_size)
  blocks = jnp.asarray(blocks)
  if blocks.dtype != jnp.bool_:
    raise TypeError(f"blocks must be a bool array, got {blocks.dtype}")
  if blocks.ndim == 2:
    blocks = blocks[None, None]
  elif blocks.ndim == 3:
    blocks = blocks[None]
  if blocks.ndim != 4:
    raise ValueError(f"blocks must be [B|1, H|1, nq, nk], got {blocks.shape}")
  nq, nk = blocks.shape[2:]
  q_len = nq * bq if q_len is None else _check_len(q_len, "q_len")
  kv_len = nk * bk if kv_len is None else _check_len(kv_len, "kv_len")
  if (-(-q_len // bq), -(-kv_len // bk)) != (nq, nk):
    raise ValueError(f"blocks has (nq, nk) = {(nq, nk)}, but q_len={q_len}, "
                     f"kv_len={kv_len} with blocks ({bq}, {bk}) need "
                     f"{(-(-q_len // bq), -(-kv_len // bk))}")
  if mask_fn is None:
    states = jnp.where(blocks, FULL, EMPTY).astype(jnp.int8)
  else:
    fn_states = _states_from_fn(mask_fn, blocks.shape[0], blocks.shape[1],
                                q_len, kv_len, bq, bk)
    states = jnp.where(blocks, fn_states, EMPTY).astype(jnp.int8)
  return BlockMask.from_states(states, block_q=bq, block_kv=bk, q_len=q_len,
                               kv_len=kv_len, mask_fn=mask_fn,
                               mask_fn_exact=mask_fn is None)


__all__ = ["full", "causal", "sliding_window", "band", "s2", "s2_coverage",
           "check_s2_params",
           "from_mask_fn", "from_block_mask"]
