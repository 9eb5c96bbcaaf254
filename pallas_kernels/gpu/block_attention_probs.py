"""Block max-pooled attention probabilities for GPU: Pallas, Triton lowering.

One program per (q block, head, batch) keeps its q block resident and walks
the visible kv blocks twice (`sparsejax.learned.probs_math`): first the row
log-sum-exp (online max and sum, no P @ V), then each block's maximum of
exp(s - lse) and its argmax, gathered into one output row of kv blocks. Kv
blocks strictly below the causal diagonal take no element mask. Memory is the
[nq, nk] output only; SeerAttention's official kernel also keeps a
[L, nk] buffer of row maxima, which the second pass avoids.

`forward` returns (max f32, argmax int32) on block-padded inputs; the
custom_vjp around it is `sparsejax.learned.block_probs` (shared by every
implementation), whose definition is
`sparsejax.learned.reference.block_attention_probs_reference`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from sparsejax.block_sparse import block_math
from sparsejax.block_sparse.block_mask import next_power_of_2
from sparsejax.learned import probs_math


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Warps and pipeline stages (None: 4 warps up to head_dim 64, else 8)."""
  num_warps: Optional[int] = None
  num_stages: int = 2

  def __post_init__(self):
    w = self.num_warps
    if w is not None and (w < 1 or w & (w - 1) or w > 16):
      raise ValueError(f"num_warps must be a power of two in [1, 16], got {w}")
    if not 1 <= self.num_stages <= 8:
      raise ValueError(f"num_stages must be in [1, 8], got {self.num_stages}")

  def warps(self, head_dim: int) -> int:
    return self.num_warps or (4 if head_dim <= 64 else 8)


def unsupported(dtype, head_dim: int, block: int, interpret: bool
                ) -> Optional[str]:
  """Why the kernel cannot run a problem, or None."""
  del dtype, interpret
  if block > 128:
    return f"needs block_size <= 128 (registers), got {block}"
  if head_dim > 256:
    return f"needs head_dim <= 256, got {head_dim}"
  return None


def _kernel(q_ref, k_ref, u_ref, a_ref, *, cfg, nq, nk):
  bs = cfg.block
  i = nq - 1 - pl.program_id(0)  # heaviest (longest causal) rows first
  q = q_ref[...]
  n_unmasked, n_total = cfg.walk(i, nk)

  def s_of(kb):
    start = pl.multiple_of(kb * bs, bs)
    return block_math.scores(q, k_ref[pl.ds(start, bs), :], cfg.scale, None)

  def vis_of(kb):
    return probs_math.visible(cfg, i * bs, kb * bs)

  carry = (jnp.full((bs,), -jnp.inf, jnp.float32),
           jnp.zeros((bs,), jnp.float32))
  carry = jax.lax.fori_loop(
      0, n_unmasked, lambda kb, c: probs_math.lse_step(s_of(kb), *c, None),
      carry)
  carry = jax.lax.fori_loop(
      n_unmasked, n_total,
      lambda kb, c: probs_math.lse_step(s_of(kb), *c, vis_of(kb)), carry)
  lse2 = probs_math.lse2(*carry)
  row_valid = i * bs + jax.lax.broadcasted_iota(jnp.int32, (bs,), 0) < cfg.q_len
  width = u_ref.shape[-1]
  lane = jax.lax.broadcasted_iota(jnp.int32, (width,), 0)

  def body(kb, c, masked):
    mx, arg = probs_math.block_max(s_of(kb), lse2,
                                   vis_of(kb) if masked else None, row_valid)
    hit = lane == kb
    return jnp.where(hit, mx, c[0]), jnp.where(hit, arg, c[1])

  out = (jnp.zeros((width,), jnp.float32), jnp.zeros((width,), jnp.int32))
  out = jax.lax.fori_loop(0, n_unmasked, lambda kb, c: body(kb, c, False),
                          out)
  out = jax.lax.fori_loop(n_unmasked, n_total,
                          lambda kb, c: body(kb, c, True), out)
  u_ref[...] = out[0]
  a_ref[...] = out[1]


def forward(q, k, cfg: probs_math.ProbsConfig):
  """(max probs f32, argmax int32) [B, H, nq, nk] on block-padded q, k."""
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  group = h // hkv
  bs = cfg.block
  nq, nk = lq // bs, lk // bs
  if d & (d - 1) or bs & (bs - 1):
    raise ValueError(f"pallas_triton needs power-of-two head_dim and block, "
                     f"got {d} and {bs}")
  tuning = cfg.tuning or TuningConfig()
  if not isinstance(tuning, TuningConfig):
    raise ValueError(f"tuning for pallas_triton must be a pallas_kernels.gpu."
                     f"block_attention_probs.TuningConfig, got "
                     f"{type(tuning).__name__}")
  width = next_power_of_2(nk)  # Triton block shapes are powers of two
  row = lambda i, hh, bb: (bb, hh, nq - 1 - i, 0)
  u, arg = pl.pallas_call(
      functools.partial(_kernel, cfg=cfg, nq=nq, nk=nk),
      grid=(nq, h, b),
      in_specs=[
          pl.BlockSpec((None, bs, None, d),
                       lambda i, hh, bb: (bb, nq - 1 - i, hh, 0)),
          pl.BlockSpec((None, lk, None, d),
                       lambda i, hh, bb: (bb, 0, hh // group, 0)),
      ],
      out_specs=[pl.BlockSpec((None, None, None, width), row),
                 pl.BlockSpec((None, None, None, width), row)],
      out_shape=[jax.ShapeDtypeStruct((b, h, nq, width), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, nq, width), jnp.int32)],
      compiler_params=pltriton.CompilerParams(
          num_warps=tuning.warps(d), num_stages=tuning.num_stages),
      interpret=cfg.interpret,
      name="sparsejax_block_attention_probs",
  )(q, k)
  return u[..., :nk], arg[..., :nk]
