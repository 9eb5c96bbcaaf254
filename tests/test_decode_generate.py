"""Generation with the NNX LM: dense equals the model's own forward, and
every method with a budget that keeps everything generates like dense."""

import pathlib
import subprocess
import sys

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import nn
from sparsejax.inference import generate
from sparsejax.inference import methods

VOCAB, SEQ = 64, 64
LENGTHS = np.array([40, 23, 9])


def _model(num_layers=2):
  att = dict(name="dense", options=dict(block_size=16), impl="reference")
  return nn.TransformerLM(vocab_size=VOCAB, seq_len=SEQ, d_model=32,
                          num_layers=num_layers, num_heads=4, num_kv_heads=2,
                          mlp_dim=64, attention=att, rngs=nnx.Rngs(0))


MODEL = _model()
TOKENS = np.random.default_rng(0).integers(4, VOCAB, (3, SEQ)).astype(
    np.int32)


def _padded(rows):
  out = np.zeros((len(rows), SEQ), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def test_dense_prefill_and_steps_equal_the_model_forward():
  gen = generate.Generator(MODEL, "dense", batch=3, max_len=SEQ, impl="xla")
  logits, caches = gen.prefill(TOKENS[:, :40], LENGTHS)
  full = MODEL(jnp.asarray(_padded([TOKENS[b, :n] for b, n in
                                    enumerate(LENGTHS)])))
  np.testing.assert_allclose(logits, full[np.arange(3), LENGTHS - 1],
                             atol=2e-5)
  lens = LENGTHS.copy()
  for _ in range(3):
    logits, caches = gen.step(caches, TOKENS[np.arange(3), lens])
    lens += 1
    full = MODEL(jnp.asarray(_padded([TOKENS[b, :n] for b, n in
                                      enumerate(lens)])))
    np.testing.assert_allclose(logits, full[np.arange(3), lens - 1],
                               atol=2e-5)
  np.testing.assert_array_equal(caches[1].lengths, lens)


# Budgets that keep every token: each method must then generate like dense.
FULL = {
    "quest": dict(token_budget=SEQ, page_size=8, dense_layers=1),
    "double_sparsity": dict(token_fraction=None, token_budget=SEQ,
                            dense_layers=0),
    "tidal": dict(token_budget=SEQ, dense_layers=0),
    "moa": dict(spans=methods.spans_from_plan(2, (1e6, 1e6), (0.0, 0.0),
                                              min_span=16, round_to=8,
                                              sink_size=4), block=8),
}


@pytest.mark.parametrize("name", sorted(FULL))
def test_every_method_with_a_full_budget_generates_like_dense(name):
  want = generate.generate(MODEL, TOKENS[:, :40], LENGTHS, max_new_tokens=3,
                           max_len=SEQ, impl="xla")
  calib = TOKENS[:2, :33] if name == "double_sparsity" else None
  got = generate.generate(MODEL, TOKENS[:, :40], LENGTHS, max_new_tokens=3,
                          method=name, max_len=SEQ, impl="xla",
                          calib_tokens=calib, **FULL[name])
  np.testing.assert_array_equal(got, want)


def test_calibration_fills_channels_and_spans():
  ds = methods.get_method("double_sparsity", channel_fraction=0.25)
  ds = ds.calibrate(MODEL, TOKENS[:2, :32])
  assert len(ds.channels) == 2 and np.asarray(ds.channels[0]).shape == (2, 2)
  m = methods.get_method("moa", density_budget=0.5, min_span=8, block=8,
                         sink_size=4).calibrate(MODEL, TOKENS[:2, :33])
  assert len(m.spans) == 2 and m.spans[0].num_kv_heads == 2
  assert np.mean([s.density(32) for s in m.spans]) <= 0.5 + 1e-9


def test_generator_rejects_bad_prompts_and_layer_variants():
  gen = generate.Generator(MODEL, "dense", batch=3, max_len=SEQ)
  with pytest.raises(ValueError, match="lengths must be"):
    gen.prefill(TOKENS[:, :40], np.array([41, 1, 1]))
  with pytest.raises(ValueError, match="exceeds max_len"):
    gen.prefill(np.zeros((3, SEQ + 1), np.int32), LENGTHS)
  with pytest.raises(ValueError, match="options are for a method"):
    generate.Generator(MODEL, methods.get_method("dense"), batch=1,
                       max_len=8, impl="xla")


def test_generate_cli_runs():
  out = subprocess.run(
      [sys.executable, "-m", "experiments.generate",
       "--config=configs/lm.py:attention=dense,small,task=needle",
       "--method=quest",
       "--method_options=token_budget=16,page_size=8,dense_layers=1",
       "--prompt_len=40", "--max_new_tokens=3"],
      check=True, capture_output=True, text=True,
      cwd=str(pathlib.Path(__file__).parents[1]))
  assert "needle exact match" in out.stdout and "quest on" in out.stdout
