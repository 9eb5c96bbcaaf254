"""NNX layers of the lowrank family, registered as attention layer variants.

`performer` (low-rank attention alone) and `scatterbrain` (Performer made
exact on a local window) keep `layers.Attention`'s parameters (wq, wk, wv,
wo) and mask handling, so a checkpoint trained with dense attention loads
into them unchanged (the drop-in evaluation of the paper). The feature
projection is drawn once, from `projection_seed` and the layer index (no
parameter key is consumed, so parameter initialisation matches a dense
model), and held as a non-parameter variable: fixed, as in the paper.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

import sparsejax as sj
from sparsejax import lowrank
from sparsejax.block_sparse.block_mask import next_power_of_2
from sparsejax.nn import attention_registry
from sparsejax.nn import layers


class FeatureProjection(nnx.Variable):
  """A layer's fixed random-feature projection W [m, head_dim]."""


def project_qkv(attn: layers.Attention, x, positions=None):
  """q, k, v [B, L, heads, head_dim] of an attention layer on x [B, L, d]
  (RoPE applied when the layer uses it), as `layers.Attention` computes
  them."""
  c = lambda p: p[...].astype(attn.dtype)
  q = jnp.einsum("bld,dhk->blhk", x, c(attn.wq))
  k = jnp.einsum("bld,dhk->blhk", x, c(attn.wk))
  v = jnp.einsum("bld,dhk->blhk", x, c(attn.wv))
  if attn.use_rope:
    if positions is None:
      positions = jnp.arange(x.shape[1])[None]
    q = layers.rope(q, positions, attn.rope_theta)
    k = layers.rope(k, positions, attn.rope_theta)
  return q, k, v


class LowRankAttention(layers.Attention):
  """GQA self-attention through Performer or Scatterbrain.

  Args (beyond `layers.Attention`'s):
    num_features: m, the Performer feature count (cosh: m / 2 rows).
    support: the Scatterbrain support (a BlockMask), or None for Performer.
    causal: decoder attention (A(i) = j <= i).
    projection_seed, layer_index: pick this layer's projection.
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int,
               head_dim: int, *, num_features: int,
               support: Optional[sj.BlockMask], causal: bool,
               projection_seed: int = 0, layer_index: int = 0,
               impl: str = "auto", use_rope: bool = True,
               rope_theta: float = 10000.0, rngs: nnx.Rngs,
               dtype=jnp.float32):
    super().__init__(d_model, num_heads, num_kv_heads, head_dim, mask=support,
                     impl=impl, use_rope=use_rope, rope_theta=rope_theta,
                     rngs=rngs, dtype=dtype)
    key = jax.random.fold_in(jax.random.key(projection_seed), layer_index)
    self.projection = FeatureProjection(
        lowrank.orthogonal_gaussian_projection(key, num_features, head_dim))
    self.causal, self.num_features = causal, num_features
    self.scatterbrain = support is not None

  def __call__(self, x, positions=None, segment_ids=None):
    """x [B, L, d_model] -> [B, L, d_model]."""
    if segment_ids is not None:
      raise NotImplementedError("segment_ids are not supported by the "
                                "low-rank layers")
    q, k, v = project_qkv(self, x, positions)
    w = self.projection.get_value()
    if self.scatterbrain:
      out = lowrank.scatterbrain_attention(q, k, v, self.mask.get_value(), w,
                                           causal=self.causal, impl=self.impl)
    else:
      out = lowrank.performer_attention(q, k, v, w, causal=self.causal)
    return jnp.einsum("blhk,hkd->bld", out.astype(self.dtype),
                      self.wo[...].astype(self.dtype))

  def attention_flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (fwd + bwd = 3x fwd): features, states and
    read-out of the low-rank part (~8 m d per head forward) plus, on the
    support, scores, values and the q_hat . k_hat correction."""
    low_rank = 24.0 * self.num_heads * self.num_features * self.head_dim
    if not self.scatterbrain:
      return low_rank
    return low_rank + (3.0 * self.num_heads * (4 * self.head_dim + 2 *
                                               self.num_features) *
                       self.visible_per_query(seq_len))


def _check_spec(name, spec):
  if spec.soft_cap is not None:
    raise ValueError(f"attention variant {name!r} does not support soft_cap")


@attention_registry.register_layer("performer")
def _performer(spec: attention_registry.LayerSpec, *, num_features: int = 32,
               projection_seed: int = 0):
  _check_spec("performer", spec)
  return LowRankAttention(
      spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim,
      num_features=num_features, support=None, causal=spec.causal,
      projection_seed=projection_seed, layer_index=spec.layer_index,
      impl=spec.impl, use_rope=spec.use_rope, rope_theta=spec.rope_theta,
      rngs=spec.rngs, dtype=spec.dtype)


def local_support(seq_len: int, window: int, *, causal: bool,
                  block_size: int) -> sj.BlockMask:
  """Scatterbrain's local support: sj.masks.sliding_window (causal: the
  `window` most recent keys; bidirectional: |q - kv| < window)."""
  block = int(min(block_size, max(16, next_power_of_2(seq_len))))
  return sj.masks.sliding_window(seq_len, window, causal=causal,
                                 block_size=block)


@attention_registry.register_layer("scatterbrain")
def _scatterbrain(spec: attention_registry.LayerSpec, *, window: int = 16,
                  num_features: int = 16, block_size: int = 16,
                  projection_seed: int = 0):
  _check_spec("scatterbrain", spec)
  return LowRankAttention(
      spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim,
      num_features=num_features,
      support=local_support(spec.seq_len, window, causal=spec.causal,
                            block_size=block_size),
      causal=spec.causal, projection_seed=projection_seed,
      layer_index=spec.layer_index, impl=spec.impl, use_rope=spec.use_rope,
      rope_theta=spec.rope_theta, rngs=spec.rngs, dtype=spec.dtype)


__all__ = ["FeatureProjection", "LowRankAttention", "local_support",
           "project_qkv"]
