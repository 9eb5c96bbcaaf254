"""Models: attention registry, NNX layers, LM and ViT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparsejax as sj
from sparsejax import nn
from sparsejax.nn import attention_registry as registry
from sparsejax.nn import layers

S2 = dict(name="s2", impl="xla",
          options=dict(block_size=16, local_blocks=2, vert_stride=2))


def _lm(attention, seq_len=64, num_layers=2):
  return nn.TransformerLM(vocab_size=64, seq_len=seq_len, d_model=32,
                          num_layers=num_layers, num_heads=4, num_kv_heads=2,
                          mlp_dim=64, attention=attention, rngs=nnx.Rngs(0))


# --- registry ---------------------------------------------------------------


def test_registry_has_builtins():
  assert {"dense", "sliding_window", "s2", "block_sparse"} <= set(
      registry.names())


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="valid names: .*dense.*s2"):
    registry.build_mask("nope", 64, 4, 2, causal=True)


def test_unknown_option_is_an_error():
  with pytest.raises(ValueError, match="valid options"):
    registry.build_mask("s2", 64, 4, 2, causal=True, widht=3)


def test_register_decorator_adds_a_variant():
  @registry.register("test_local_only")
  def _local(seq_len, num_heads, num_kv_heads, *, causal, block_size=16):
    del num_heads, num_kv_heads, causal
    return sj.masks.sliding_window(seq_len, block_size, block_size=block_size)

  mask = registry.build_mask("test_local_only", 64, 4, 2, causal=True)
  dense = np.asarray(mask.to_dense())[0, 0]
  assert dense[40, 30] and not dense[40, 10] and not dense[10, 40]
  with pytest.raises(ValueError, match="already registered"):
    registry.register("test_local_only")(_local)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(), ["s2"] * 4),
    (dict(dense_every_n=2), ["s2", "dense", "s2", "dense"]),
    (dict(dense_first=1, dense_last=1), ["dense", "s2", "s2", "dense"]),
    (dict(layers="s2,dense,sliding_window,s2"),
     ["s2", "dense", "sliding_window", "s2"]),
])
def test_layer_schedule(kwargs, expected):
  assert registry.layer_schedule(4, "s2", **kwargs) == expected


def test_layer_schedule_checks_length_and_names():
  with pytest.raises(ValueError, match="num_layers=4"):
    registry.layer_schedule(4, "s2", layers=["s2"])
  with pytest.raises(ValueError, match="unknown attention variant"):
    registry.layer_schedule(2, "s2", layers="s2,bogus")


def test_block_sparse_pattern_is_causal_inside_blocks():
  pattern = np.ones((4, 4), bool)
  mask = registry.build_mask("block_sparse", 64, 4, 4, causal=True,
                             pattern=pattern, block_size=16)
  np.testing.assert_array_equal(np.asarray(mask.to_dense())[0, 0],
                                np.tril(np.ones((64, 64), bool)))


# --- layers -----------------------------------------------------------------


def test_rmsnorm_unit_rms():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16)) * 7.0
  y = layers.RMSNorm(16)(x)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y**2, -1)), 1.0, rtol=1e-4)


def test_rope_is_relative():
  """<rope(q, i), rope(k, j)> depends on i - j only."""
  q, k = jax.random.normal(jax.random.key(1), (2, 1, 1, 1, 8))
  dot = lambda i, j: jnp.sum(layers.rope(q, jnp.array([[i]])) *
                             layers.rope(k, jnp.array([[j]])))
  np.testing.assert_allclose(dot(5, 2), dot(13, 10), rtol=1e-4)


def test_attention_matches_dense_gqa():
  attn = layers.Attention(32, 4, 2, 8, mask=sj.masks.causal(64, block_size=16),
                          impl="xla", use_rope=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (2, 64, 32))
  q = jnp.einsum("bld,dhk->blhk", x, attn.wq[...])
  k = jnp.repeat(jnp.einsum("bld,dhk->blhk", x, attn.wk[...]), 2, axis=2)
  v = jnp.repeat(jnp.einsum("bld,dhk->blhk", x, attn.wv[...]), 2, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
  s = jnp.where(np.tril(np.ones((64, 64), bool)), s, -jnp.inf)
  o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)
  want = jnp.einsum("blhk,hkd->bld", o, attn.wo[...])
  np.testing.assert_allclose(attn(x), want, atol=1e-4, rtol=1e-4)


# --- LM ---------------------------------------------------------------------


@pytest.mark.parametrize("attention", [
    S2, dict(S2, dense_every_n=2),
    dict(name="sliding_window", impl="xla",
         options=dict(window=16, block_size=16))])
def test_lm_is_causal(attention):
  model = _lm(attention)
  tokens = jax.random.randint(jax.random.key(3), (2, 64), 0, 64)
  logits = model(tokens)
  assert logits.shape == (2, 64, 64) and logits.dtype == jnp.float32
  changed = model(tokens.at[:, 40:].set(7))
  np.testing.assert_allclose(logits[:, :40], changed[:, :40], atol=1e-5)
  assert not np.allclose(logits[:, 40:], changed[:, 40:])


def test_masks_are_state_not_params():
  model = _lm(dict(S2, dense_every_n=2))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  assert all(jnp.issubdtype(x.dtype, jnp.floating)
             for x in jax.tree.leaves(params))
  masks = nnx.state(model, layers.AttentionMask)
  assert jax.tree.leaves(masks) and all(
      x.dtype == jnp.int32 for x in jax.tree.leaves(rest))


def test_lm_grads_finite_and_sparse_flops_lower():
  s2, dense = _lm(S2, seq_len=128), _lm(dict(name="dense", impl="xla",
                                             options=dict(block_size=16)),
                                        seq_len=128)
  assert s2.flops_per_token() < dense.flops_per_token()
  graphdef, params, rest = nnx.split(s2, nnx.Param, ...)
  tokens = jnp.ones((1, 128), jnp.int32)
  loss = lambda p: nnx.merge(graphdef, p, rest)(tokens).mean()
  grads = jax.grad(loss)(params)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_unknown_model_attention_name():
  with pytest.raises(ValueError, match="valid names"):
    _lm(dict(name="sparse_magic"))


def test_sequence_classifier_forward():
  model = nn.SequenceClassifier(
      vocab_size=32, num_classes=10, seq_len=64, d_model=32, num_layers=1,
      num_heads=4, num_kv_heads=2, mlp_dim=64, attention=S2,
      rngs=nnx.Rngs(0))
  logits = model(jnp.ones((2, 64), jnp.int32))
  assert logits.shape == (2, 10) and model.flops_per_token() > 0


# --- ViT --------------------------------------------------------------------


@pytest.mark.parametrize("attention", [
    dict(name="dense", impl="xla"),
    dict(name="s2", impl="xla",
         options=dict(block_size=16, local_blocks=1, vert_stride=2))])
def test_vit_forward(attention):
  model = nn.ViT(image_shape=(32, 32, 3), num_classes=10, patch_size=4,
                 d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
                 mlp_dim=64, attention=attention, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
  assert model.patchify(images).shape == (2, 8, 8, 48)
  logits = model(images)
  assert logits.shape == (2, 10) and bool(jnp.isfinite(logits).all())
