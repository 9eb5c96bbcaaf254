"""Decoder-only LM (and a bidirectional sequence classifier).

RoPE, RMSNorm, SwiGLU, GQA; each layer's attention mask comes from
`attention_registry`, so hybrid schedules (e.g. S2 with every 4th layer
dense) are a config change.
"""

from typing import Any, Mapping, Optional

import jax.numpy as jnp
from flax import nnx

from sparsejax.nn import attention_registry
from sparsejax.nn import layers


def build_layer_masks(num_layers: int, seq_len: int, num_heads: int,
                      num_kv_heads: int, attention: Mapping[str, Any], *,
                      causal: bool) -> list[Any]:
  """One `BlockMask` (or None) per layer from an attention config.

  `attention` holds `name`, `options` (per-variant) and the schedule keys
  `dense_every_n`, `dense_first`, `dense_last`, `layers` (see
  `attention_registry.layer_schedule`).
  """
  name = attention["name"]
  options = dict(attention.get("options") or {})
  schedule = attention_registry.layer_schedule(
      num_layers, name,
      dense_every_n=attention.get("dense_every_n", 0) or 0,
      dense_first=attention.get("dense_first", 0) or 0,
      dense_last=attention.get("dense_last", 0) or 0,
      layers=attention.get("layers"))
  # Options belong to the main variant: strict for it, shared where they fit
  # (block_size) for override layers.
  return [attention_registry.build_mask(
      n, seq_len, num_heads, num_kv_heads, causal=causal, strict=(n == name),
      **options) for n in schedule]


def _init_trunk(model, *, vocab_size, seq_len, d_model, num_layers, num_heads,
                num_kv_heads, mlp_dim, attention, head_dim, rope_theta, dtype,
                rngs, causal):
  """Embedding, attention blocks and final norm shared by both models."""
  head_dim = head_dim or d_model // num_heads
  masks = build_layer_masks(num_layers, seq_len, num_heads, num_kv_heads,
                            attention, causal=causal)
  model.seq_len, model.dtype = seq_len, dtype
  model.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
  model.blocks = nnx.List([
      layers.Block(d_model, mlp_dim, rngs=rngs, dtype=dtype,
                   attention=layers.Attention(
                       d_model, num_heads, num_kv_heads, head_dim, mask=mask,
                       impl=attention.get("impl", "auto"),
                       soft_cap=attention.get("soft_cap"),
                       rope_theta=rope_theta, rngs=rngs, dtype=dtype))
      for mask in masks])
  model.final_norm = layers.RMSNorm(d_model)


def _run_trunk(model, tokens):
  """tokens [B, L] -> normalised hidden states [B, L, d_model]."""
  x = model.embed(tokens).astype(model.dtype)
  positions = jnp.arange(tokens.shape[1])[None]
  for block in model.blocks:
    x = block(x, positions)
  return model.final_norm(x)


def flops_per_token(model) -> float:
  """Training FLOPs per token: 6 * matmul params + attention scores."""
  n = sum(p.size for path, p in nnx.iter_graph(model)
          if isinstance(p, nnx.Param) and "embed" not in map(str, path))
  attn = sum(12 * b.attn.num_heads * b.attn.head_dim *
             b.attn.visible_per_query(model.seq_len) for b in model.blocks)
  return 6.0 * n + attn


class TransformerLM(nnx.Module):
  """tokens int32 [B, L] -> logits f32 [B, L, vocab]."""

  def __init__(self, *, vocab_size: int, seq_len: int, d_model: int,
               num_layers: int, num_heads: int, num_kv_heads: int,
               mlp_dim: int, attention: Mapping[str, Any],
               head_dim: Optional[int] = None, rope_theta: float = 10000.0,
               dtype=jnp.float32, rngs: nnx.Rngs):
    _init_trunk(self, vocab_size=vocab_size, seq_len=seq_len,
                d_model=d_model, num_layers=num_layers, num_heads=num_heads,
                num_kv_heads=num_kv_heads, mlp_dim=mlp_dim,
                attention=attention, head_dim=head_dim,
                rope_theta=rope_theta, dtype=dtype, rngs=rngs, causal=True)
    self.unembed = nnx.Linear(d_model, vocab_size, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = _run_trunk(self, tokens)
    return (x @ self.unembed.kernel[...].astype(self.dtype)).astype(
        jnp.float32)

  flops_per_token = flops_per_token


class SequenceClassifier(nnx.Module):
  """Bidirectional encoder, mean-pooled: tokens [B, L] -> logits [B, C].

  The same blocks as the LM with non-causal masks (e.g. ListOps).
  """

  def __init__(self, *, vocab_size: int, num_classes: int, seq_len: int,
               d_model: int, num_layers: int, num_heads: int,
               num_kv_heads: int, mlp_dim: int, attention: Mapping[str, Any],
               head_dim: Optional[int] = None, rope_theta: float = 10000.0,
               dtype=jnp.float32, rngs: nnx.Rngs):
    _init_trunk(self, vocab_size=vocab_size, seq_len=seq_len,
                d_model=d_model, num_layers=num_layers, num_heads=num_heads,
                num_kv_heads=num_kv_heads, mlp_dim=mlp_dim,
                attention=attention, head_dim=head_dim,
                rope_theta=rope_theta, dtype=dtype, rngs=rngs, causal=False)
    self.head = nnx.Linear(d_model, num_classes, rngs=rngs)

  def __call__(self, tokens):
    return self.head(_run_trunk(self, tokens).mean(1).astype(jnp.float32))

  flops_per_token = flops_per_token
