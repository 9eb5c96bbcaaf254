"""The lowrank layer variants (`performer`, `scatterbrain`) in the models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax import lowrank
from sparsejax import nn
from sparsejax.nn import attention_registry as registry
from sparsejax.nn import layers
from sparsejax.nn import lowrank_layers

SB = dict(name="scatterbrain", impl="xla",
          options=dict(window=8, num_features=16, block_size=16))
PERF = dict(name="performer", impl="xla", options=dict(num_features=16))
DENSE = dict(name="dense", impl="xla", options=dict(block_size=16))


def _lm(attention, seq_len=48):
  return nn.TransformerLM(vocab_size=64, seq_len=seq_len, d_model=32,
                          num_layers=1, num_heads=4, num_kv_heads=2,
                          mlp_dim=64, attention=attention, rngs=nnx.Rngs(0))


def test_registered_as_layer_variants():
  for name in ("performer", "scatterbrain"):
    assert registry.is_layer_variant(name)


@pytest.mark.parametrize("attention", [SB, PERF], ids=["scatterbrain",
                                                       "performer"])
def test_lm_is_causal_and_trains(attention):
  model = _lm(attention)
  tokens = jax.random.randint(jax.random.key(3), (2, 48), 0, 64)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  fwd = jax.jit(lambda p, t: nnx.merge(graphdef, p, rest)(t))
  logits = fwd(params, tokens)
  changed = fwd(params, tokens.at[:, 30:].set(7))
  np.testing.assert_allclose(logits[:, :30], changed[:, :30], atol=1e-5)
  assert not np.allclose(logits[:, 30:], changed[:, 30:])
  grads = jax.jit(jax.grad(lambda p: fwd(p, tokens).mean()))(params)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  # The projection is fixed state, not a parameter.
  assert not any("projection" in str(path) for path, _ in
                 jax.tree_util.tree_flatten_with_path(params)[0])
  assert jax.tree.leaves(nnx.state(model, lowrank_layers.FeatureProjection))


def test_dense_params_load_unchanged():
  """Same parameter tree and initial values as dense attention: a dense
  checkpoint drops in (the paper's evaluation without fine-tuning)."""
  dense = nnx.state(_lm(DENSE), nnx.Param)
  sb = nnx.state(_lm(SB), nnx.Param)
  assert jax.tree.structure(dense) == jax.tree.structure(sb)
  for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(sb)):
    np.testing.assert_array_equal(a, b)


def test_scatterbrain_layer_is_the_op():
  attn = lowrank_layers.LowRankAttention(
      32, 4, 2, 8, num_features=16, causal=False, use_rope=False,
      support=lowrank_layers.local_support(40, 6, causal=False,
                                           block_size=16),
      impl="xla", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (1, 40, 32))
  q = jnp.einsum("bld,dhk->blhk", x, attn.wq[...])
  k = jnp.einsum("bld,dhk->blhk", x, attn.wk[...])
  v = jnp.einsum("bld,dhk->blhk", x, attn.wv[...])
  o = lowrank.scatterbrain_attention(q, k, v, attn.mask.get_value(),
                                     attn.projection.get_value(),
                                     impl="reference")
  want = jnp.einsum("blhk,hkd->bld", o, attn.wo[...])
  graphdef, state = nnx.split(attn)
  got = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
  assert isinstance(attn, layers.Attention)


def test_vit_forward_and_flops():
  kw = dict(image_shape=(16, 16, 3), num_classes=10, patch_size=4,
            d_model=32, num_layers=1, num_heads=4, num_kv_heads=4,
            mlp_dim=64, rngs=nnx.Rngs(0))
  sb, perf = nn.ViT(attention=SB, **kw), nn.ViT(attention=PERF, **kw)
  graphdef, state = nnx.split(sb)
  out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(
      state, jax.random.normal(jax.random.key(4), (2, 16, 16, 3)))
  assert out.shape == (2, 10) and bool(jnp.isfinite(out).all())
  assert sb.flops_per_token() > perf.flops_per_token() > 0


def test_soft_cap_is_rejected():
  with pytest.raises(ValueError, match="soft_cap"):
    _lm(dict(SB, soft_cap=5.0))
