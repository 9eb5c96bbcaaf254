"""Block max-pooled attention probabilities for TPU: Pallas, Mosaic lowering.

Grid (batch, head, q block, step) with 2 * nk steps on the last
("arbitrary") axis: steps [0, nk) accumulate the row log-sum-exp of the q
block in VMEM, steps [nk, 2 nk) turn each kv block's logits into
probabilities exp(s - lse) and write the block maximum and its argmax into
the q block's output row (resident across the steps). The causal structure is
analytic, so no scalar prefetch is needed: the k index_map clamps steps past
the diagonal to the last visible block (already resident: no DMA) and
`pl.when` skips their compute. Shared math: `sparsejax.learned.probs_math`.

Layout as in `block_sparse_attention.py`: q/k viewed as [B, L, H * D]
(head_dim zero-padded to 128 on hardware), outputs [B, H, nq, 1, width]
whose last two block dims are the full (1, width).

`forward` returns (max f32, argmax int32) on block-padded inputs; the
custom_vjp around it is `sparsejax.learned.block_probs`, whose definition is
`sparsejax.learned.reference.block_attention_probs_reference`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sparsejax.block_sparse import block_math
from sparsejax.learned import probs_math

NUM_LANES = 128
NUM_SUBLANES = 8


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Compiler settings (the block size comes from the call)."""
  # Split the (batch, head, q block) axes over megacore TensorCores.
  megacore: bool = True
  vmem_limit_bytes: Optional[int] = None

  def __post_init__(self):
    if not isinstance(self.megacore, bool):
      raise ValueError(f"megacore must be a bool, got {self.megacore!r}")
    if self.vmem_limit_bytes is not None and (
        not isinstance(self.vmem_limit_bytes, int)
        or self.vmem_limit_bytes < (1 << 20)):
      raise ValueError(f"vmem_limit_bytes must be None or an int >= 1 MiB, "
                       f"got {self.vmem_limit_bytes!r}")

  def compiler_params(self) -> pltpu.CompilerParams:
    par = "parallel" if self.megacore else "arbitrary"
    return pltpu.CompilerParams(
        dimension_semantics=(par, par, par, "arbitrary"),
        vmem_limit_bytes=self.vmem_limit_bytes)


def unsupported(dtype, head_dim: int, block: int, interpret: bool
                ) -> Optional[str]:
  """Why the kernel cannot run a problem, or None."""
  del dtype, head_dim
  if not interpret and block % NUM_LANES:
    return (f"needs block_size a multiple of {NUM_LANES} (TPU lanes), got "
            f"{block}")
  return None


def _interpret_params(flag):
  if not flag:
    return False
  if isinstance(flag, pltpu.InterpretParams):
    return flag
  return pltpu.InterpretParams(detect_races=True)


def _kernel(q_ref, k_ref, u_ref, a_ref, m_ref, l_ref, *, cfg, nk):
  bs = cfg.block
  i, j = pl.program_id(2), pl.program_id(3)
  n_unmasked, n_total = cfg.walk(i, nk)
  second = j >= nk
  kb = jnp.where(second, j - nk, j)

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    u_ref[...] = jnp.zeros(u_ref.shape, jnp.float32)
    a_ref[...] = jnp.zeros(a_ref.shape, jnp.int32)

  def logits():
    return block_math.scores(q_ref[...], k_ref[...], cfg.scale, None)

  def lse_step(masked):
    vis = probs_math.visible(cfg, i * bs, kb * bs) if masked else None
    m, l = probs_math.lse_step(logits(), m_ref[...][:, 0], l_ref[...][:, 0],
                               vis)
    m_ref[...] = m[:, None]
    l_ref[...] = l[:, None]

  def max_step(masked):
    vis = probs_math.visible(cfg, i * bs, kb * bs) if masked else None
    row_valid = (i * bs + jax.lax.broadcasted_iota(jnp.int32, (bs,), 0)
                 < cfg.q_len)
    lse2 = probs_math.lse2(m_ref[...][:, 0], l_ref[...][:, 0])
    mx, arg = probs_math.block_max(logits(), lse2, vis, row_valid,
                                   keepdims=True)
    lane = jax.lax.broadcasted_iota(jnp.int32, u_ref.shape, 1)
    u_ref[...] = jnp.where(lane == kb, mx, u_ref[...])
    a_ref[...] = jnp.where(lane == kb, arg, a_ref[...])

  unmasked = kb < n_unmasked
  listed = kb < n_total
  pl.when(~second & unmasked)(lambda: lse_step(False))
  pl.when(~second & listed & ~unmasked)(lambda: lse_step(True))
  pl.when(second & unmasked)(lambda: max_step(False))
  pl.when(second & listed & ~unmasked)(lambda: max_step(True))


def forward(q, k, cfg: probs_math.ProbsConfig):
  """(max probs f32, argmax int32) [B, H, nq, nk] on block-padded q, k."""
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  group = h // hkv
  bs = cfg.block
  nq, nk = lq // bs, lk // bs
  interpret = _interpret_params(cfg.interpret)
  tuning = cfg.tuning or TuningConfig()
  if not isinstance(tuning, TuningConfig):
    raise ValueError(f"tuning for pallas_tpu must be a pallas_kernels.tpu."
                     f"block_attention_probs.TuningConfig, got "
                     f"{type(tuning).__name__}")
  if not interpret and bs % NUM_LANES:
    raise ValueError(f"pallas_tpu needs block_size a multiple of {NUM_LANES}"
                     f", got {bs}")
  dp = d if interpret else -(-d // NUM_LANES) * NUM_LANES
  width = nk if interpret else -(-nk // NUM_LANES) * NUM_LANES

  def view(x):
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, dp - d)))
    return x.reshape(x.shape[0], x.shape[1], -1)

  def kv_block(bb, hh, i, j):
    kb = jnp.where(j >= nk, j - nk, j)
    last = jnp.minimum(i, nk - 1) if cfg.causal else nk - 1
    return bb, jnp.minimum(kb, last), hh // group

  out_block = pl.BlockSpec((None, None, None, 1, width),
                           lambda bb, hh, i, j: (bb, hh, i, 0, 0))
  u, arg = pl.pallas_call(
      functools.partial(_kernel, cfg=cfg, nk=nk),
      grid=(b, h, nq, 2 * nk),
      in_specs=[pl.BlockSpec((None, bs, dp),
                             lambda bb, hh, i, j: (bb, i, hh)),
                pl.BlockSpec((None, bs, dp), kv_block)],
      out_specs=[out_block, out_block],
      out_shape=[jax.ShapeDtypeStruct((b, h, nq, 1, width), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, nq, 1, width), jnp.int32)],
      scratch_shapes=[pltpu.VMEM((bs, 1), jnp.float32),
                      pltpu.VMEM((bs, 1), jnp.float32)],
      compiler_params=tuning.compiler_params(),
      interpret=interpret,
      name="sparsejax_block_attention_probs_tpu",
  )(view(q), view(k))
  return u[:, :, :, 0, :nk], arg[:, :, :, 0, :nk]
