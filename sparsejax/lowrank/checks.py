"""Argument checks shared by the low-rank ops (ValueError/TypeError naming
the argument and what was expected)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.block_sparse.block_mask import BlockMask
from sparsejax.lowrank import features

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def qkv(q, k, v, projection, *, allow_f64: bool = False) -> None:
  """Shapes [B, L, H, D] / [B, L, Hkv, D], a shared float dtype, GQA, and a
  projection [m, D]."""
  dtypes = DTYPES + ((jnp.float64,) if allow_f64 else ())
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "ndim") or x.ndim != 4:
      raise ValueError(f"{name} must be a rank-4 array [batch, len, heads, "
                       f"head_dim], got shape {getattr(x, 'shape', None)}")
    if x.dtype not in dtypes:
      raise TypeError(f"{name} must be float32, bfloat16 or float16, got "
                      f"{x.dtype}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                    f"{v.dtype}")
  b, _, h, d = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got {k.shape} and "
                     f"{v.shape}")
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k must be [batch={b}, kv_len, kv_heads, head_dim={d}],"
                     f" got {k.shape}")
  if h % k.shape[2]:
    raise ValueError(f"q heads ({h}) must be divisible by kv heads "
                     f"({k.shape[2]})")
  features.check_projection(projection, d)


def mask_fits(mask, q, k) -> None:
  if not isinstance(mask, BlockMask):
    raise TypeError(f"mask must be None or a sparsejax.BlockMask, got "
                    f"{type(mask).__name__}")
  mask.check_compatible(batch=q.shape[0], heads=q.shape[2], q_len=q.shape[1],
                        kv_len=k.shape[1])


def _concrete(mask: BlockMask) -> bool:
  return not any(isinstance(getattr(mask, f), jax.core.Tracer)
                 for f in BlockMask._ARRAYS)  # pylint: disable=protected-access


def causal_support(mask: BlockMask) -> None:
  """ValueError if a causal call's support reaches a future key (kv > q).

  Full blocks must lie on or below the diagonal; partial blocks that cross
  it are checked element by element with the mask's own mask_fn. A mask
  built under jit (traced lists) cannot be checked: there the support is
  the caller's promise.
  """
  if not _concrete(mask):
    return
  bq, bk = mask.block_q, mask.block_kv
  rows = np.arange(mask.num_q_blocks)
  first_q = rows * bq
  for kind in ("full", "partial"):
    counts = np.asarray(getattr(mask, f"{kind}_counts"))
    idx = np.asarray(getattr(mask, f"{kind}_idx"))
    listed = np.arange(idx.shape[-1]) < counts[..., None]
    last_kv = np.minimum(idx * bk + bk, mask.kv_len) - 1
    # A block reaches the future for some row iff its last key is past the
    # block row's first query (lengths clip the tails).
    crossing = listed & (last_kv > first_q[None, None, :, None])
    if not crossing.any():
      continue
    if kind == "full":
      b, h, i, t = np.argwhere(crossing)[0]
      raise ValueError(
          f"mask reaches the future under causal=True: q block {i} (batch "
          f"{b}, head {h}) lists kv block {idx[b, h, i, t]} as full; the "
          f"causal support must have kv <= q")
    b, h, i, t = np.nonzero(crossing)
    qi = first_q[i][:, None, None] + np.arange(bq)[None, :, None]
    kj = (idx[b, h, i, t] * bk)[:, None, None] + np.arange(bk)[None, None, :]
    with jax.ensure_compile_time_eval():  # a concrete check, even under jit
      visible = mask.kernel_mask_fn(b[:, None, None], h[:, None, None],
                                    jnp.asarray(qi), jnp.asarray(kj))
      visible = np.asarray(jnp.broadcast_to(visible, (len(b), bq, bk)))
    bad = visible & (kj > qi) & (qi < mask.q_len) & (kj < mask.kv_len)
    if bad.any():
      n = int(np.argwhere(bad.any((1, 2)))[0, 0])
      raise ValueError(
          f"mask reaches the future under causal=True: q block {i[n]} (batch "
          f"{b[n]}, head {h[n]}) sees keys after its queries in kv block "
          f"{idx[b[n], h[n], i[n], t[n]]}; the causal support must have "
          f"kv <= q")
