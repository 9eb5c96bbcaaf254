"""SeerAttention's prefill gate: pooled q/k -> block scores -> a BlockMask.

As in microsoft/SeerAttention (`seer_attn/prefill_sparse/attn_gate.py`,
gate type `Qavg_Kmaxminavg`): q and k *before RoPE* are pooled per block
(kernel = stride = block, ceil mode: the last block pools its valid tokens),
q by its average and k by the concatenation of max, min and average; a
per-head linear map (no bias; k is repeated to the q heads for GQA) takes them
to `hidden` dims, RoPE rotates them at the block positions (each block's first
position), and S = Qg Kg^T / sqrt(hidden) scores every (q block, kv block)
pair, block-causal with the diagonal kept.

Selection (`select_blocks`) is a threshold on softmax(S) or a per-row top-k
whose k comes from a causal density by the paper's rule
k = int((1 - sqrt(1 - density)) * nb); the last `last_dense` q-block rows
and the diagonal are always kept. `gate_mask` turns the selection into a
traced `BlockMask` (no recompiles when it changes; top-k builds its lists
from the top-k indices, `block_lists.py`), `gate_block_mask` does it for a
kept-block array, and `gate_kl_loss` is the distillation loss against
`block_attention_probs`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.block_sparse import masks as masks_lib
from sparsejax.learned import block_lists

_POOLS = ("avg", "max", "min")


def pool_blocks(x, block_size: int, kinds: Sequence[str]):
  """[B, L, H, D] -> [B, ceil(L / block), H, len(kinds) * D] (f32).

  Ceil mode: the last block pools only its valid tokens.
  """
  for kind in kinds:
    if kind not in _POOLS:
      raise ValueError(f"pool kinds must be among {_POOLS}, got {kind!r}")
  b, l, h, d = x.shape
  nb = -(-l // block_size)
  xf = jnp.pad(x.astype(jnp.float32),
               ((0, 0), (0, nb * block_size - l), (0, 0), (0, 0)))
  xf = xf.reshape(b, nb, block_size, h, d)
  valid = (jnp.arange(nb * block_size) < l).reshape(1, nb, block_size, 1, 1)
  count = jnp.minimum(block_size, l - jnp.arange(nb) * block_size)
  pooled = {
      "avg": lambda: jnp.where(valid, xf, 0.0).sum(2) / count[None, :, None,
                                                               None],
      "max": lambda: jnp.where(valid, xf, -jnp.inf).max(2),
      "min": lambda: jnp.where(valid, xf, jnp.inf).min(2),
  }
  return jnp.concatenate([pooled[kind]() for kind in kinds], axis=-1)


def _rope(x, positions, theta):
  from sparsejax.nn.layers import rope  # pylint: disable=g-import-not-at-top
  return rope(x, positions, theta)


class AttnGate(nnx.Module):
  """Block scores [B, H, nq, nk] from un-roped q [B,L,H,D], k [B,L,Hkv,D].

  Args:
    num_heads: query heads (one gate per query head).
    num_kv_heads: key heads (repeated to the query heads, GQA).
    head_dim: q/k head width.
    block_size: tokens per block (the paper: 64).
    hidden: gate width per head (the paper: 128).
    q_pool, k_pool: pooling kinds concatenated (default avg / max,min,avg).
    rope_theta: RoPE base for the block positions.
  """

  def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, *,
               block_size: int = 64, hidden: int = 128,
               q_pool: Sequence[str] = ("avg",),
               k_pool: Sequence[str] = ("max", "min", "avg"),
               rope_theta: float = 10000.0, rngs: nnx.Rngs):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} must be divisible by "
                       f"num_kv_heads={num_kv_heads}")
    if hidden % 2:
      raise ValueError(f"hidden must be even (RoPE pairs), got {hidden}")
    masks_lib._check_block_size(block_size)  # pylint: disable=protected-access
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                             in_axis=1, out_axis=2)
    key = rngs.params
    self.wq = nnx.Param(init(key(), (num_heads, len(q_pool) * head_dim,
                                     hidden)))
    self.wk = nnx.Param(init(key(), (num_heads, len(k_pool) * head_dim,
                                     hidden)))
    self.block_size, self.hidden = block_size, hidden
    self.q_pool, self.k_pool = tuple(q_pool), tuple(k_pool)
    self.rope_theta = rope_theta
    self.num_heads = num_heads

  def __call__(self, q, k, positions: Optional[jax.Array] = None):
    """Masked block logits f32 [B, H, nq, nk]: -inf above the diagonal."""
    b, lq, h, _ = q.shape
    if h != self.num_heads:
      raise ValueError(f"q has {h} heads, the gate was built for "
                       f"{self.num_heads}")
    qp = pool_blocks(q, self.block_size, self.q_pool)
    kp = pool_blocks(k, self.block_size, self.k_pool)
    kp = jnp.repeat(kp, h // kp.shape[2], axis=2)
    qg = jnp.einsum("bnhd,hde->bnhe", qp, self.wq[...])
    kg = jnp.einsum("bnhd,hde->bnhe", kp, self.wk[...])
    if positions is None:
      positions = jnp.arange(max(lq, k.shape[1]))[None]
    block_pos = positions[:, ::self.block_size]
    qg = _rope(qg, block_pos[:, :qg.shape[1]], self.rope_theta)
    kg = _rope(kg, block_pos[:, :kg.shape[1]], self.rope_theta)
    s = jnp.einsum("bihe,bjhe->bhij", qg, kg) / math.sqrt(self.hidden)
    nq, nk = s.shape[2:]
    return jnp.where(block_causal(nq, nk), s, -jnp.inf)


def block_causal(nq: int, nk: int):
  """bool [nq, nk]: kv block j <= q block i (the diagonal included)."""
  return jnp.arange(nk)[None, :] <= jnp.arange(nq)[:, None]


def density_to_topk(density: float, num_blocks: int) -> int:
  """Per-row k for a causal block density (SeerAttention's `nz_ratio`).

  Rows keeping min(k, i + 1) of their i + 1 causal blocks give a density of
  about 1 - (1 - k / nb)^2, so k = int((1 - sqrt(1 - density)) * nb), at
  least 1.
  """
  if not 0.0 < density <= 1.0:
    raise ValueError(f"density must be in (0, 1], got {density}")
  return max(1, int((1.0 - math.sqrt(1.0 - density)) * num_blocks))


def select_blocks(scores, *, density: Optional[float] = None,
                  threshold: Optional[float] = None, last_dense: int = 2):
  """bool [B, H, nq, nk] of kept blocks from masked gate logits.

  Exactly one of `density` (top-k per row, `density_to_topk`) or
  `threshold` (softmax over kv blocks > threshold) selects; the diagonal
  and the last `last_dense` q-block rows are always kept, and nothing above
  the diagonal.
  """
  if (density is None) == (threshold is None):
    raise ValueError("pass exactly one of density= and threshold=")
  nq, nk = scores.shape[2:]
  causal = block_causal(nq, nk)
  if threshold is not None:
    keep = jax.nn.softmax(scores, axis=-1) > threshold
  else:
    keep = top_k_mask(scores, density_to_topk(density, nk))
  rows = jnp.arange(nq)[:, None]
  forced = (rows == jnp.arange(nk)[None, :]) | (rows >= nq - last_dense)
  return (keep | forced) & causal


def top_k_mask(scores, k: int):
  """bool, scores' shape: the k largest entries of each row (last axis).

  A scatter of the top-k indices: exactly k per row (ties broken by
  lax.top_k), and no [..., k, n] one-hot in memory.
  """
  n = scores.shape[-1]
  _, idx = jax.lax.top_k(scores, min(k, n))
  return index_mask(idx, n)


def index_mask(idx, n: int):
  """bool [..., n], True at the indices idx [..., k] (a scatter)."""
  rows = idx.reshape(-1, idx.shape[-1])
  keep = jnp.zeros((rows.shape[0], n), jnp.bool_).at[
      jnp.arange(rows.shape[0])[:, None], rows].set(True)
  return keep.reshape(idx.shape[:-1] + (n,))


def select_lists(scores, *, density: float):
  """`select_blocks`' top-k selection as lists: (counts [B, H, nq], idx
  [B, H, nq, k]) of each row's kept blocks below the diagonal (the
  diagonal and the dense last rows are added by `gate_mask`). No [nq, nk]
  pass beyond the top-k itself."""
  nk = scores.shape[-1]
  _, idx = jax.lax.top_k(scores, min(density_to_topk(density, nk), nk))
  return block_lists.below_diagonal(idx, unique=True)


def gate_mask(scores, *, block_size: int, q_len: int,
              density: Optional[float] = None,
              threshold: Optional[float] = None, last_dense: int = 2,
              width: Optional[int] = None):
  """The causal `BlockMask` of `select_blocks(scores, ...)` (traced).

  Top-k (density) builds the lists from the top-k indices; a threshold
  compresses its kept-block array once. width pads the lists (equal
  shapes share compiled kernels).
  """
  if (density is None) == (threshold is None):
    raise ValueError("pass exactly one of density= and threshold=")
  if threshold is not None:
    blocks = select_blocks(scores, threshold=threshold, last_dense=last_dense)
    return block_lists.causal_mask_from_blocks(blocks, block_size=block_size,
                                               q_len=q_len)
  counts, idx = select_lists(scores, density=density)
  return block_lists.causal_mask_from_lists(
      counts, idx, block_size=block_size, q_len=q_len, dense_rows=last_dense,
      width=width)


def gate_block_mask(blocks, *, block_size: int, q_len: int,
                    kv_len: Optional[int] = None):
  """A causal `BlockMask` from a kept-block pattern (traced under jit).

  The diagonal blocks are always kept (as `select_blocks` keeps them);
  self-attention only (kv_len, if given, must equal q_len).
  """
  if kv_len is not None and kv_len != q_len:
    raise ValueError(f"gate masks are for self-attention: kv_len ({kv_len})"
                     f" must equal q_len ({q_len})")
  return block_lists.causal_mask_from_blocks(blocks, block_size=block_size,
                                             q_len=q_len)


def gate_kl_loss(scores, target, *, skip_frac: float = 0.25):
  """KL(target || softmax(scores)) as torch's KLDivLoss(reduction='mean').

  The first `skip_frac` of the q-block rows are dropped, as the official
  training does "for stability"; the mean is over every remaining element
  (masked blocks count as zeros). scores: masked gate logits; target:
  `block_attention_probs` (row-normalised), both [B, H, nq, nk].
  """
  start = int(scores.shape[2] * skip_frac)
  logq = jax.nn.log_softmax(scores[:, :, start:], axis=-1)
  p = jax.lax.stop_gradient(target[:, :, start:]).astype(jnp.float32)
  safe_p = jnp.where(p > 0, p, 1.0)
  kl = jnp.where(p > 0, p * (jnp.log(safe_p) - jnp.where(p > 0, logq, 0.0)),
                 0.0)
  return kl.mean()


def causal_density(blocks) -> jax.Array:
  """Kept fraction of the causal block pairs, per [B, H]."""
  nq, nk = blocks.shape[2:]
  return blocks.sum((2, 3)) / block_causal(nq, nk).sum()
