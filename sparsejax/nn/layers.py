"""Flax NNX building blocks: RMSNorm, RoPE, SwiGLU and GQA self-attention.

Parameters are f32; `dtype` is the compute dtype. Weight names (wq, wk, wv,
wo, w_gate, w_up, w_down, ...) are what `training/sharding.py` matches on.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sparsejax as sj


class AttentionMask(nnx.Variable):
  """Holds a layer's static `BlockMask`: state, but never a parameter.

  Splitting with `nnx.split(model, nnx.Param, ...)` keeps it out of the
  gradient and optimizer state.
  """


class StepState(nnx.Variable):
  """Non-parameter state that the forward updates and the train step keeps
  (e.g. Routing Transformer k-means centroids): carried in the train state's
  `model_state` and checkpointed, never differentiated or optimized."""


class AuxLoss(nnx.Variable):
  """A loss term a layer writes during the forward: create it in __init__
  (`self.aux = AuxLoss(jnp.zeros(()))`, so the graph never changes shape)
  and assign its value in __call__; the train step adds every AuxLoss to
  the task loss."""


def _init(in_axis, out_axis, scale=1.0):
  return nnx.initializers.variance_scaling(
      scale, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned scale, computed in f32."""

  def __init__(self, dim: int, *, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0):
  """Rotary position embedding on x [B, L, H, D] at positions [B|1, L]."""
  half = x.shape[-1] // 2
  freq = theta ** (-np.arange(half, dtype=np.float32) / half)
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B,L,1,D/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  return out.astype(x.dtype)


class SwiGLU(nnx.Module):
  """Gated MLP: w_down(silu(x @ w_gate) * (x @ w_up))."""

  def __init__(self, d_model: int, mlp_dim: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.w_gate = nnx.Param(_init(0, 1)(rngs.params(), (d_model, mlp_dim)))
    self.w_up = nnx.Param(_init(0, 1)(rngs.params(), (d_model, mlp_dim)))
    self.w_down = nnx.Param(_init(0, 1)(rngs.params(), (mlp_dim, d_model)))
    self.dtype = dtype

  def __call__(self, x):
    c = lambda p: p[...].astype(self.dtype)
    h = jax.nn.silu(x @ c(self.w_gate)) * (x @ c(self.w_up))
    return h @ c(self.w_down)


class Attention(nnx.Module):
  """GQA self-attention through `sj.attention` with a static block mask.

  Args:
    d_model: model width.
    num_heads: query heads.
    num_kv_heads: key/value heads; must divide num_heads.
    head_dim: per-head width.
    mask: the layer's `sj.BlockMask` (built once, outside jit) or None for
      full bidirectional attention.
    impl: `sj.attention` implementation name ("auto", "xla", ...).
    interpret: run a Pallas impl in interpret mode (CPU).
    use_rope: rotate q and k (LMs); ViTs use learned positions instead.
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int,
               head_dim: int, *, mask: Optional[sj.BlockMask] = None,
               impl: str = "auto", use_rope: bool = True,
               rope_theta: float = 10000.0, soft_cap: Optional[float] = None,
               rngs: nnx.Rngs, dtype=jnp.float32, interpret: bool = False):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} must be divisible by "
                       f"num_kv_heads={num_kv_heads}")
    key = rngs.params
    self.wq = nnx.Param(_init(0, (1, 2))(key(), (d_model, num_heads, head_dim)))
    self.wk = nnx.Param(
        _init(0, (1, 2))(key(), (d_model, num_kv_heads, head_dim)))
    self.wv = nnx.Param(
        _init(0, (1, 2))(key(), (d_model, num_kv_heads, head_dim)))
    self.wo = nnx.Param(
        _init((0, 1), 2)(key(), (num_heads, head_dim, d_model)))
    self.mask = AttentionMask(mask) if mask is not None else None
    self.impl, self.use_rope, self.rope_theta = impl, use_rope, rope_theta
    self.soft_cap, self.dtype, self.interpret = soft_cap, dtype, interpret
    self.num_heads, self.head_dim = num_heads, head_dim

  def __call__(self, x, positions=None, segment_ids=None):
    """x [B, L, d_model] -> [B, L, d_model]; segment_ids [B, L] or None
    (packed documents: attention stays inside each id; pass per-document
    positions for RoPE)."""
    c = lambda p: p[...].astype(self.dtype)
    q = jnp.einsum("bld,dhk->blhk", x, c(self.wq))
    k = jnp.einsum("bld,dhk->blhk", x, c(self.wk))
    v = jnp.einsum("bld,dhk->blhk", x, c(self.wv))
    if self.use_rope:
      if positions is None:
        positions = jnp.arange(x.shape[1])[None]
      q = rope(q, positions, self.rope_theta)
      k = rope(k, positions, self.rope_theta)
    mask = self.mask.get_value() if self.mask is not None else None
    out = sj.attention(q, k, v, mask, soft_cap=self.soft_cap, impl=self.impl,
                       q_segment_ids=segment_ids, interpret=self.interpret)
    return jnp.einsum("blhk,hkd->bld", out.astype(self.dtype), c(self.wo))

  def visible_per_query(self, seq_len: int) -> float:
    """Average number of keys a query sees (block granularity), for FLOPs."""
    if self.mask is None:
      return float(seq_len)
    m = self.mask.get_value()
    blocks = (np.asarray(m.full_counts) + np.asarray(m.partial_counts)).mean()
    return float(min(seq_len, blocks * m.block_kv))

  def attention_flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs of scores and values per token (fwd + bwd)."""
    return 12.0 * self.num_heads * self.head_dim * self.visible_per_query(
        seq_len)


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)); x + mlp(norm(x))."""

  def __init__(self, d_model: int, mlp_dim: int, *, attention: Attention,
               rngs: nnx.Rngs, dtype=jnp.float32):
    self.attn_norm = RMSNorm(d_model)
    self.attn = attention
    self.mlp_norm = RMSNorm(d_model)
    self.mlp = SwiGLU(d_model, mlp_dim, rngs=rngs, dtype=dtype)

  def __call__(self, x, positions=None, segment_ids=None):
    x = x + self.attn(self.attn_norm(x), positions, segment_ids)
    return x + self.mlp(self.mlp_norm(x))
