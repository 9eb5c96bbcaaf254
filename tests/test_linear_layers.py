"""The lightning layer variant: registration, the hybrid LM through the
config, causality, training on CPU and decode equal to the full forward."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lm as lm_config
from sparsejax import data, nn, training
from sparsejax.evals import compare
from sparsejax.linear import generate
from sparsejax.nn import attention_registry
from sparsejax.nn import layers
from sparsejax.nn.linear_layers import LightningAttention


def _hybrid_config(**overrides):
  """A 2-layer lightning / softmax LM on the byte corpus (tiny)."""
  config = lm_config.get_config("attention=lightning,small")
  return compare.apply_overrides(config, {
      "attention.dense_every_n": 2, "attention.impl": "xla",
      "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 2,
      "model.num_kv_heads": 2, "progress_bar": False, **overrides})


def _model(config):
  return nn.build_model(config, data.task_info(config.data))


def test_registered_with_factory_options():
  assert "lightning" in attention_registry.names()
  assert attention_registry.is_layer_variant("lightning")
  config = lm_config.get_config("attention=lightning")
  assert dict(config.attention.options) == dict(
      decay="minimax", chunk_size=0, scale=1.0, output_gate=True)


def test_hybrid_schedule_and_minimax_slopes():
  config = _hybrid_config(**{"model.num_layers": 8,
                             "attention.dense_every_n": 8})
  model = _model(config)
  kinds = [type(b.attn).__name__ for b in model.blocks]
  assert kinds == ["LightningAttention"] * 7 + ["Attention"]  # 7 : 1
  first, last = model.blocks[0].attn, model.blocks[6].attn
  # MiniMax rule: the decay weakens with depth (layer l of all 8).
  assert first.slopes[0] > last.slopes[0] > 0
  np.testing.assert_allclose(
      first.slopes, np.asarray(model.blocks[0].attn.slopes))
  assert model.flops_per_token() > 0


def test_layer_is_causal_and_rejects_segments():
  layer = LightningAttention(16, 2, 8, slopes=(0.5, 0.0), impl="xla",
                             rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 20, 16))
  run = nnx.jit(lambda layer, x: layer(x))
  y = run(layer, x)
  x2 = x.at[:, 12:].set(jax.random.normal(jax.random.key(1), (1, 8, 16)))
  y2 = run(layer, x2)
  np.testing.assert_allclose(y[:, :12], y2[:, :12], rtol=1e-5, atol=1e-6)
  assert not np.allclose(y[:, 12:], y2[:, 12:])
  with pytest.raises(NotImplementedError, match="segment_ids"):
    layer(x, segment_ids=jnp.zeros((1, 20), jnp.int32))
  with pytest.raises(ValueError, match="slopes must have num_heads=2"):
    LightningAttention(16, 2, 8, slopes=(0.5,), rngs=nnx.Rngs(0))


def test_decode_equals_full_forward():
  """Prefill 40 tokens, then 24 teacher-forced decode steps (recurrent state
  in the lightning layer, KV cache in the softmax one)."""
  model = _model(_hybrid_config())
  tokens = jax.random.randint(jax.random.key(2), (2, 64), 0, 250)
  full = nnx.jit(lambda m, t: m(t))(model, tokens)
  logits, cache = nnx.jit(lambda m, t: generate.prefill(m, t))(
      model, tokens[:, :40])
  np.testing.assert_allclose(logits, full[:, :40], rtol=2e-4, atol=2e-4)
  step = jax.jit(lambda cache, tok: generate.decode_step(model, cache, tok))
  for t in range(40, 64):
    logits, cache = step(cache, tokens[:, t])
    np.testing.assert_allclose(logits, full[:, t], rtol=2e-4, atol=2e-4)
  assert int(cache["pos"]) == 64
  assert cache["layers"][0]["state"].shape == (2, 2, 16, 16)  # constant

  out = generate.generate(model, tokens[:, :5], 4)
  assert out.shape == (2, 9)
  again = nnx.jit(lambda m, t: m(t))(model, jnp.pad(out, ((0, 0),
                                                          (0, 64 - 9))))
  np.testing.assert_array_equal(jnp.argmax(again[:, 4:8], -1), out[:, 5:9])


def test_generation_rejects_non_causal_softmax_layers():
  attn = layers.Attention(16, 2, 2, 8, mask=None, rngs=nnx.Rngs(0))
  model = types.SimpleNamespace(blocks=[types.SimpleNamespace(attn=attn)])
  with pytest.raises(ValueError, match="dense causal softmax"):
    generate.check_model(model)


def test_hybrid_lm_trains_and_loss_drops(tmp_path):
  config = _hybrid_config(**{
      "num_train_steps": 12, "batch_size": 8, "eval_batch_size": 8,
      "eval_steps": 1, "log_every": 1, "checkpoint.every": 12})
  result = training.train_and_evaluate(config, str(tmp_path))
  _, losses = zip(*result["history"])
  assert np.isfinite(losses).all()
  assert np.mean(losses[-3:]) < losses[0] - 0.3, losses
  assert np.isfinite(result["eval"]["loss"])
