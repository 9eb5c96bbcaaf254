"""The Scatterbrain evidence harness: budgets and q/k/v capture (fast)."""

import jax
import numpy as np
from flax import nnx

from sparsejax import nn
from sparsejax.evals import scatterbrain_eval as se
from sparsejax.nn import lowrank_layers


def test_budget_accounting_is_the_papers():
  """One feature counts as two keys: local b keys = Performer b/2 features
  = Scatterbrain b/2 keys + b/4 features (bidirectional windows have
  2w - 1 keys)."""
  s = se.method_settings(64, causal=True)
  assert s["local"] == dict(window=64)
  assert s["performer"] == dict(num_features=32)
  assert s["scatterbrain"] == dict(window=32, num_features=16)
  assert s["local_part"] == dict(window=32)
  assert s["performer_part"] == dict(num_features=16)
  b = se.method_settings(64, causal=False)
  assert b["local"]["window"] * 2 - 1 == 63
  assert b["scatterbrain"] == dict(window=16, num_features=16)


def test_capture_qkv_is_the_layers_projection():
  model = nn.TransformerLM(vocab_size=32, seq_len=32, d_model=32,
                           num_layers=1, num_heads=4, num_kv_heads=2,
                           mlp_dim=64, rngs=nnx.Rngs(0),
                           attention=dict(name="dense", impl="xla",
                                          options=dict(block_size=16)))
  tokens = jax.random.randint(jax.random.key(0), (1, 32), 0, 32)
  q, k, v = se.capture_qkv(model, tokens, 0)
  block = model.blocks[0]
  x = block.attn_norm(model.embed(tokens))
  for got, want in zip((q, k, v),
                       lowrank_layers.project_qkv(block.attn, x)):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  assert q.shape == (1, 32, 4, 8) and k.shape == (1, 32, 2, 8)
  assert not isinstance(block.attn, se._Capture)  # pylint: disable=protected-access
