"""Prefill and decode for hybrid lightning / softmax LMs (`TransformerLM`).

Lightning layers keep their recurrent f32 state [B, heads, d, d] (constant
memory per token, `lightning_decode` per step); softmax layers, which must be
dense causal (the "dense" variant of a hybrid schedule), keep a KV cache of
`max_len` positions. Every sequence of the batch has the same length.

  logits, cache = prefill(model, prompt, max_len=256)
  logits, cache = decode_step(model, cache, next_token)      # [B] tokens
  tokens = generate(model, prompt, num_tokens=32)            # greedy

Teacher-forced, prefill + decode steps give the logits of the full forward
(tests/test_linear_layers.py checks it).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
from flax import nnx

import sparsejax as sj
from sparsejax.nn import layers as nn_layers
from sparsejax.nn.linear_layers import LightningAttention


def _kind(attn) -> str:
  if isinstance(attn, LightningAttention):
    return "lightning"
  if isinstance(attn, nn_layers.Attention):
    mask = attn.mask.get_value() if attn.mask is not None else None
    if mask is not None and mask.mask_fn == sj.mask_fns.Causal(0):
      return "softmax"
  raise ValueError(f"generation supports lightning layers and dense causal "
                   f"softmax layers, got {type(attn).__name__} (sparse masks "
                   f"have no decode path here)")


def check_model(model) -> List[str]:
  """The per-layer kinds ("lightning" / "softmax"); ValueError otherwise."""
  return [_kind(block.attn) for block in model.blocks]


def _softmax_qkv(attn, x, positions):
  c = lambda p: p[...].astype(attn.dtype)
  q = jnp.einsum("bld,dhk->blhk", x, c(attn.wq))
  k = jnp.einsum("bld,dhk->blhk", x, c(attn.wk))
  v = jnp.einsum("bld,dhk->blhk", x, c(attn.wv))
  if attn.use_rope:
    q = nn_layers.rope(q, positions, attn.rope_theta)
    k = nn_layers.rope(k, positions, attn.rope_theta)
  return q, k, v


def _softmax_out(attn, o):
  return jnp.einsum("blhk,hkd->bld", o.astype(attn.dtype),
                    attn.wo[...].astype(attn.dtype))


def _cache_attention(attn, q, k_cache, v_cache, pos):
  """q [B, 1, H, D] over cache positions <= pos (f32 softmax, GQA)."""
  b, _, h, d = q.shape
  hkv = k_cache.shape[2]
  qg = q.reshape(b, hkv, h // hkv, d).astype(jnp.float32)
  s = jnp.einsum("bgqd,btgd->bgqt", qg, k_cache.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) * d ** -0.5
  if attn.soft_cap is not None:
    s = attn.soft_cap * jnp.tanh(s / attn.soft_cap)
  visible = jnp.arange(k_cache.shape[1]) <= pos
  p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
  o = jnp.einsum("bgqt,btgd->bgqd", p, v_cache.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  return o.reshape(b, 1, h, d)


def _logits(model, x):
  x = model.final_norm(x)
  return (x @ model.unembed.kernel[...].astype(model.dtype)).astype(
      jnp.float32)


def prefill(model, tokens, *, max_len: Optional[int] = None):
  """Runs the prompt [B, L]; returns (logits [B, L, V], cache).

  cache: dict(pos=L (int32), layers=[per layer: dict(state=...) for
  lightning, dict(k=..., v=...) of max_len positions for softmax]).
  """
  kinds = check_model(model)
  b, length = tokens.shape
  max_len = max_len or model.seq_len
  if length > max_len:
    raise ValueError(f"prompt length {length} exceeds max_len={max_len}")
  positions = jnp.arange(length)[None]
  x = model.embed(tokens).astype(model.dtype)
  caches: List[Dict[str, Any]] = []
  for block, kind in zip(model.blocks, kinds):
    h = block.attn_norm(x)
    attn = block.attn
    if kind == "lightning":
      out, state = attn.prefill(h)
      caches.append(dict(state=state))
    else:
      q, k, v = _softmax_qkv(attn, h, positions)
      tile = min(128, max(16, 1 << (length - 1).bit_length()))
      o = sj.attention(q, k, v, sj.masks.causal(length, block_size=tile),
                       soft_cap=attn.soft_cap, impl=attn.impl)
      out = _softmax_out(attn, o)
      pad = ((0, 0), (0, max_len - length), (0, 0), (0, 0))
      caches.append(dict(k=jnp.pad(k, pad), v=jnp.pad(v, pad)))
    x = x + out
    x = x + block.mlp(block.mlp_norm(x))
  return _logits(model, x), dict(pos=jnp.asarray(length, jnp.int32),
                                 layers=caches)


def decode_step(model, cache, tokens):
  """One token per sequence (tokens [B] at position cache["pos"]); returns
  (logits [B, V], the cache advanced by one)."""
  kinds = check_model(model)
  pos = cache["pos"]
  x = model.embed(tokens[:, None]).astype(model.dtype)
  new_layers = []
  for block, kind, layer in zip(model.blocks, kinds, cache["layers"]):
    h = block.attn_norm(x)
    attn = block.attn
    if kind == "lightning":
      out, state = attn.decode(h, layer["state"])
      new_layers.append(dict(state=state))
    else:
      q, k, v = _softmax_qkv(attn, h, jnp.reshape(pos, (1, 1)))
      start = (0, pos, 0, 0)
      kc = jax.lax.dynamic_update_slice(layer["k"], k.astype(
          layer["k"].dtype), start)
      vc = jax.lax.dynamic_update_slice(layer["v"], v.astype(
          layer["v"].dtype), start)
      out = _softmax_out(attn, _cache_attention(attn, q, kc, vc, pos))
      new_layers.append(dict(k=kc, v=vc))
    x = x + out
    x = x + block.mlp(block.mlp_norm(x))
  return _logits(model, x)[:, 0], dict(pos=pos + 1, layers=new_layers)


def generate(model, prompt, num_tokens: int, *,
             max_len: Optional[int] = None, temperature: float = 0.0,
             rng: Optional[jax.Array] = None):
  """prompt [B, L] -> tokens [B, L + num_tokens]: greedy (temperature 0) or
  sampled. Prefill and the decode steps (a lax.scan) run in one jit."""
  check_model(model)  # eagerly: clear errors before tracing
  if num_tokens < 1:
    raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
  max_len = max_len or prompt.shape[1] + num_tokens
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng")
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)

  def pick(logits, key):
    if temperature <= 0:
      return jnp.argmax(logits, -1).astype(prompt.dtype)
    return jax.random.categorical(key, logits / temperature).astype(
        prompt.dtype)

  @jax.jit
  def run(state, prompt, rng):
    model = nnx.merge(graphdef, state)
    logits, cache = prefill(model, prompt, max_len=max_len)
    keys = jax.random.split(rng, num_tokens)
    first = pick(logits[:, -1], keys[0])

    def step(carry, key):
      cache, token = carry
      logits, cache = decode_step(model, cache, token)
      nxt = pick(logits, key)
      return (cache, nxt), nxt

    _, rest = jax.lax.scan(step, (cache, first), keys[1:])
    return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)

  return run(state, prompt, rng)
