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


def layer_names(num_layers: int, attention: Mapping[str, Any]) -> list[str]:
  """The per-layer variant names of an attention config (its schedule)."""
  return attention_registry.layer_schedule(
      num_layers, attention["name"],
      dense_every_n=attention.get("dense_every_n", 0) or 0,
      dense_first=attention.get("dense_first", 0) or 0,
      dense_last=attention.get("dense_last", 0) or 0,
      layers=attention.get("layers"))


def build_layer_masks(num_layers: int, seq_len: int, num_heads: int,
                      num_kv_heads: int, attention: Mapping[str, Any], *,
                      causal: bool) -> list[Any]:
  """One `BlockMask` (or None) per mask-variant layer of an attention config.

  `attention` holds `name`, `options` (per-variant) and the schedule keys
  `dense_every_n`, `dense_first`, `dense_last`, `layers` (see
  `attention_registry.layer_schedule`). Layer variants give None.
  """
  name = attention["name"]
  options = dict(attention.get("options") or {})
  # Options belong to the main variant: strict for it, shared where they fit
  # (block_size) for override layers.
  return [None if attention_registry.is_layer_variant(n) else
          attention_registry.build_mask(
              n, seq_len, num_heads, num_kv_heads, causal=causal,
              strict=(n == name), **options)
          for n in layer_names(num_layers, attention)]


def build_attention_layers(num_layers: int, attention: Mapping[str, Any], *,
                           d_model: int, num_heads: int, num_kv_heads: int,
                           head_dim: int, seq_len: int, causal: bool, rngs,
                           dtype, use_rope: bool = True,
                           rope_theta: float = 10000.0, grid=None) -> list:
  """One token-mixing module per layer, from the attention config.

  Mask variants become `layers.Attention` over their BlockMask; layer
  variants (linear, vision, learned, ...) are built by their own factory.
  """
  name = attention["name"]
  options = dict(attention.get("options") or {})
  names = layer_names(num_layers, attention)
  masks = build_layer_masks(num_layers, seq_len, num_heads, num_kv_heads,
                            attention, causal=causal)
  out = []
  for i, (n, mask) in enumerate(zip(names, masks)):
    spec = attention_registry.LayerSpec(
        d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, seq_len=seq_len, causal=causal, rngs=rngs,
        dtype=dtype, impl=attention.get("impl", "auto"),
        soft_cap=attention.get("soft_cap"), use_rope=use_rope,
        rope_theta=rope_theta, grid=grid, layer_index=i,
        num_layers=num_layers)
    if attention_registry.is_layer_variant(n):
      out.append(attention_registry.build_layer(n, spec, strict=(n == name),
                                                **options))
    else:
      out.append(layers.Attention(
          d_model, num_heads, num_kv_heads, head_dim, mask=mask,
          impl=spec.impl, soft_cap=spec.soft_cap, use_rope=use_rope,
          rope_theta=rope_theta, rngs=rngs, dtype=dtype,
          interpret=bool(attention.get("interpret", False))))
  return out


def _init_trunk(model, *, vocab_size, seq_len, d_model, num_layers, num_heads,
                num_kv_heads, mlp_dim, attention, head_dim, rope_theta, dtype,
                rngs, causal):
  """Embedding, attention blocks and final norm shared by both models."""
  head_dim = head_dim or d_model // num_heads
  mixers = build_attention_layers(
      num_layers, attention, d_model=d_model, num_heads=num_heads,
      num_kv_heads=num_kv_heads, head_dim=head_dim, seq_len=seq_len,
      causal=causal, rngs=rngs, dtype=dtype, rope_theta=rope_theta)
  model.seq_len, model.dtype = seq_len, dtype
  model.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
  model.blocks = nnx.List([
      layers.Block(d_model, mlp_dim, rngs=rngs, dtype=dtype, attention=mixer)
      for mixer in mixers])
  model.final_norm = layers.RMSNorm(d_model)


def _run_trunk(model, tokens, segment_ids=None, positions=None):
  """tokens [B, L] -> normalised hidden states [B, L, d_model].

  segment_ids [B, L] (packed documents): attention stays inside a segment;
  positions default to 0..L-1 (pass per-document positions with packing).
  """
  x = model.embed(tokens).astype(model.dtype)
  if positions is None:
    positions = jnp.arange(tokens.shape[1])[None]
  for block in model.blocks:
    x = block(x, positions, segment_ids)
  return model.final_norm(x)


def flops_per_token(model) -> float:
  """Training FLOPs per token: 6 * matmul params + attention scores."""
  n = sum(p.size for path, p in nnx.iter_graph(model)
          if isinstance(p, nnx.Param) and "embed" not in map(str, path))
  attn = sum(b.attn.attention_flops_per_token(model.seq_len)
             for b in model.blocks)
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

  def __call__(self, tokens, segment_ids=None, positions=None):
    x = _run_trunk(self, tokens, segment_ids, positions)
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
