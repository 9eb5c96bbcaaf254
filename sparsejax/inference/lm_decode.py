"""The NNX LM layer by layer, for prefill, decode steps and calibration.

Uses a `sparsejax.nn.TransformerLM`'s own modules and parameters (embedding,
each block's norms, MLP and the q/k/v/o projections of its
`layers.Attention`, RoPE as that layer applies it, the final norm and
unembedding); only the attention call is replaced, by whatever the caller
passes. Every function is pure in (model, arrays), so jit it with the model
closed over or split (`nnx.split`) as usual.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

import sparsejax as sj
from sparsejax.block_sparse.block_mask import next_power_of_2
from sparsejax.nn import layers


def prefill_block(seq_len: int, block_size: int = 128) -> int:
  """A prompt mask's block: block_size, or less for short prompts (a power
  of two >= 16, as BlockMasks need)."""
  return max(16, min(block_size, next_power_of_2(seq_len)))


def check_model(model) -> None:
  """ValueError unless every block mixes tokens with `layers.Attention`."""
  for i, block in enumerate(getattr(model, "blocks", ())):
    if not isinstance(block.attn, layers.Attention):
      raise ValueError(f"decode needs softmax attention layers "
                       f"(sparsejax.nn.layers.Attention); layer {i} is "
                       f"{type(block.attn).__name__}")
  if not hasattr(model, "unembed"):
    raise ValueError("decode needs a TransformerLM (embed, blocks, "
                     "final_norm, unembed)")


def dims(model):
  """(num_layers, num_heads, num_kv_heads, head_dim)."""
  attn = model.blocks[0].attn
  return (len(model.blocks), attn.num_heads, attn.wk.shape[1],
          attn.head_dim)


def project(attn: layers.Attention, x, positions):
  """x [B, L, d_model] -> q [B, L, H, D], k, v [B, L, Hkv, D] (RoPE'd)."""
  c = lambda p: p[...].astype(attn.dtype)
  q = jnp.einsum("bld,dhk->blhk", x, c(attn.wq))
  k = jnp.einsum("bld,dhk->blhk", x, c(attn.wk))
  v = jnp.einsum("bld,dhk->blhk", x, c(attn.wv))
  if attn.use_rope:
    q = layers.rope(q, positions, attn.rope_theta)
    k = layers.rope(k, positions, attn.rope_theta)
  return q, k, v


def output(attn: layers.Attention, o):
  """Attention output [B, L, H, D] -> [B, L, d_model]."""
  return jnp.einsum("blhk,hkd->bld", o.astype(attn.dtype),
                    attn.wo[...].astype(attn.dtype))


def logits(model, x):
  """Final norm and unembedding of hidden states [..., d_model] (f32)."""
  x = model.final_norm(x)
  return (x @ model.unembed.kernel[...].astype(model.dtype)).astype(
      jnp.float32)


AttendFn = Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array]


def forward(model, tokens, attend: AttendFn, *, positions=None,
            on_qkv: Optional[Callable[[int, tuple], None]] = None):
  """Hidden states [B, L, d_model] with attend(layer, q, k, v) -> o.

  on_qkv(layer, (q, k, v)) sees every layer's projections (calibration,
  cache writes).
  """
  x = model.embed(tokens).astype(model.dtype)
  if positions is None:
    positions = jnp.arange(tokens.shape[1])[None]
  for i, block in enumerate(model.blocks):
    q, k, v = project(block.attn, block.attn_norm(x), positions)
    if on_qkv is not None:
      on_qkv(i, (q, k, v))
    x = x + output(block.attn, attend(i, q, k, v))
    x = x + block.mlp(block.mlp_norm(x))
  return x


def causal_attend(masks_by_layer, impl: str = "auto"):
  """attend() through sj.attention with one BlockMask per layer."""
  def attend(i, q, k, v):
    return sj.attention(q, k, v, masks_by_layer[i], impl=impl)
  return attend


def probs_attend(deltas, scale_by_layer=None):
  """attend() with materialised causal softmax probabilities A, plus
  deltas[i] [B, H, L, L] added to A (zeros: the gradient with respect to the
  deltas is dL/dA, MoA's profiling input)."""
  def attend(i, q, k, v):
    b, l, h, d = q.shape
    g = h // k.shape[2]
    s = jnp.einsum("blhd,bmhd->bhlm", q.astype(jnp.float32),
                   jnp.repeat(k, g, axis=2).astype(jnp.float32)) * d ** -0.5
    causal = jnp.tril(jnp.ones((l, l), bool))
    a = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
    a = a + deltas[i]
    o = jnp.einsum("bhlm,bmhd->blhd", a,
                   jnp.repeat(v, g, axis=2).astype(jnp.float32))
    if scale_by_layer is not None:
      scale_by_layer[i] = a
    return o.astype(q.dtype)
  return attend


def capture_qk(model, tokens):
  """Per layer, the post-RoPE (q, k) of a causal forward over tokens
  [B, L] (Double Sparsity's calibration input)."""
  n_layers = len(model.blocks)
  masks = [sj.masks.causal(tokens.shape[1],
                           block_size=prefill_block(tokens.shape[1]))
           ] * n_layers

  def run(tokens):
    seen = {}
    forward(model, tokens, causal_attend(masks, "xla"),
            on_qkv=lambda i, qkv: seen.__setitem__(i, qkv[:2]))
    return [seen[i] for i in range(n_layers)]

  return jax.jit(run)(tokens)
