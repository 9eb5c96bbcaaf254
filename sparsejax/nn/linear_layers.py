"""NNX layers of the linear family, registered as attention layer variants.

`lightning`: the MiniMax-Text-01 / TransNormerLLM lightning-attention block,
  q, k, v = SiLU(x W_q), SiLU(x W_k), SiLU(x W_v)       (no RoPE, no 1/sqrt(d))
  o = lightning_attention(q, k, v, slopes of this layer)
  out = (RMSNorm(o over all heads' channels) * sigmoid(x W_gate)) W_o
With `attention.dense_every_n=N` the LM interleaves a softmax ("dense")
layer every N layers (MiniMax-Text-01: N = 8, 7 lightning : 1 softmax).
Decoding keeps one f32 state [heads, d, d] per layer instead of a KV cache
(`prefill` / `decode`, used by sparsejax.linear.generate).
"""

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import sparsejax as sj
from sparsejax.nn import attention_registry
from sparsejax.nn.layers import RMSNorm

# Chunked FLOPs use the kernels' default chunk.
_FLOP_CHUNK = 64


def _init(in_axis, out_axis):
  return nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


class LightningAttention(nnx.Module):
  """Lightning attention with SiLU q/k/v, RMSNorm and a sigmoid output gate.

  Args:
    d_model: model width.
    num_heads: heads (q, k and v alike; no GQA in lightning layers).
    head_dim: per-head width (d_k = d_v).
    slopes: per-head decay slopes (see sparsejax.linear.DECAY_RULES).
    impl: `sj.linear.lightning_attention` implementation.
    chunk_size: chunk of the chunked implementations (None: default).
    scale: multiplies q (1.0 in MiniMax).
    output_gate: apply the sigmoid gate.
  """

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *,
               slopes: Sequence[float], impl: str = "auto",
               chunk_size: Optional[int] = None, scale: float = 1.0,
               output_gate: bool = True, rngs: nnx.Rngs, dtype=jnp.float32):
    if len(slopes) != num_heads:
      raise ValueError(f"slopes must have num_heads={num_heads} entries, got "
                       f"{len(slopes)}")
    key = rngs.params
    shape = (d_model, num_heads, head_dim)
    self.wq = nnx.Param(_init(0, (1, 2))(key(), shape))
    self.wk = nnx.Param(_init(0, (1, 2))(key(), shape))
    self.wv = nnx.Param(_init(0, (1, 2))(key(), shape))
    self.w_gate = (nnx.Param(_init(0, 1)(key(), (d_model,
                                                 num_heads * head_dim)))
                   if output_gate else None)
    self.wo = nnx.Param(_init((0, 1), 2)(key(), (num_heads, head_dim,
                                                 d_model)))
    self.norm = RMSNorm(num_heads * head_dim)
    self.slopes = tuple(float(s) for s in slopes)  # static, never trained
    self.impl, self.chunk_size, self.scale = impl, chunk_size, float(scale)
    self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype

  def _qkv(self, x):
    c = lambda p: p[...].astype(self.dtype)
    proj = lambda w: jax.nn.silu(jnp.einsum("bld,dhk->blhk", x, c(w)))
    return proj(self.wq), proj(self.wk), proj(self.wv)

  def _finish(self, x, o):
    b, l = o.shape[:2]
    o = self.norm(o.reshape(b, l, -1).astype(self.dtype))
    if self.w_gate is not None:
      o = o * jax.nn.sigmoid(x @ self.w_gate[...].astype(self.dtype))
    o = o.reshape(b, l, self.num_heads, self.head_dim)
    return jnp.einsum("blhk,hkd->bld", o, self.wo[...].astype(self.dtype))

  def _slopes(self):
    return jnp.asarray(self.slopes, jnp.float32)

  def __call__(self, x, positions=None, segment_ids=None):
    """x [B, L, d_model] -> [B, L, d_model]; positions are unused (the decay
    carries order)."""
    del positions
    if segment_ids is not None:
      raise NotImplementedError("segment_ids (packed documents) are not "
                                "supported by lightning layers yet")
    q, k, v = self._qkv(x)
    o = sj.linear.lightning_attention(
        q, k, v, self._slopes(), scale=self.scale, impl=self.impl,
        chunk_size=self.chunk_size)
    return self._finish(x, o)

  def prefill(self, x):
    """(output [B, L, d_model], state [B, heads, d, d] f32 after token L-1)."""
    q, k, v = self._qkv(x)
    o, state = sj.linear.lightning_attention(
        q, k, v, self._slopes(), scale=self.scale, impl=self.impl,
        chunk_size=self.chunk_size, return_final_state=True)
    return self._finish(x, o), state

  def decode(self, x, state):
    """One token per sequence: x [B, 1, d_model] -> (output, new state)."""
    q, k, v = (y[:, 0] for y in self._qkv(x))
    impl = self.impl if self.impl in sj.linear.DECODE_REGISTRY.names() else (
        "auto")
    o, state = sj.linear.lightning_decode(q, k, v, state, self._slopes(),
                                          scale=self.scale, impl=impl)
    return self._finish(x, o[:, None]), state

  def attention_flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs of the token mixing per token (fwd + bwd = 3 x fwd):
    chunked, 2 C (d_k + d_v) + 4 d_k d_v per head forward."""
    del seq_len
    d = self.head_dim
    return 3.0 * self.num_heads * (2 * _FLOP_CHUNK * 2 * d + 4 * d * d)


@attention_registry.register_layer("lightning")
def _lightning(spec: attention_registry.LayerSpec, *, decay: str = "minimax",
               chunk_size: int = 0, scale: float = 1.0,
               output_gate: bool = True):
  """decay: a sparsejax.linear.DECAY_RULES name, evaluated for this layer's
  index in the whole stack; chunk_size 0: the implementation's default. The
  config's attention.impl is used when lightning has that implementation
  (else "auto")."""
  slopes = sj.linear.decay_slopes(decay, spec.num_heads, spec.layer_index,
                                  spec.num_layers)
  impl = spec.impl if spec.impl in sj.linear.REGISTRY.names() else "auto"
  return LightningAttention(
      spec.d_model, spec.num_heads, spec.head_dim, slopes=slopes, impl=impl,
      chunk_size=chunk_size or None, scale=scale, output_gate=output_gate,
      rngs=spec.rngs, dtype=spec.dtype)
