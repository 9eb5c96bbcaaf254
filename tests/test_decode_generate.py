"""Generation with the NNX LM: dense equals the model's own forward, and
every method with a budget that keeps everything generates like dense."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import nn
from sparsejax.inference import generate
from sparsejax.inference import methods
from sparsejax.inference import moa_profile

VOCAB, SEQ = 64, 64
LENGTHS = np.array([40, 23, 9])


def _model(num_layers=2):
  att = dict(name="dense", options=dict(block_size=16), impl="reference")
  return nn.TransformerLM(vocab_size=VOCAB, seq_len=SEQ, d_model=32,
                          num_layers=num_layers, num_heads=4, num_kv_heads=2,
                          mlp_dim=64, attention=att,
                          # RBG: threefry's eager init compiles for seconds
                          rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


MODEL = _model()
TOKENS = np.random.default_rng(0).integers(4, VOCAB, (3, SEQ)).astype(
    np.int32)


def _padded(rows):
  out = np.zeros((len(rows), SEQ), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def _forward():
  graphdef, state = nnx.split(MODEL)
  fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  return lambda tokens: fn(state, jnp.asarray(tokens))


@functools.lru_cache(maxsize=None)
def _dense():
  """One dense Generator (its prefill and step compile once) and its
  greedy tokens, shared by the tests below."""
  gen = generate.Generator(MODEL, "dense", batch=3, max_len=SEQ, impl="xla")
  return gen, np.asarray(gen.generate(TOKENS[:, :40], LENGTHS,
                                      max_new_tokens=3))


def test_dense_prefill_and_steps_equal_the_model_forward():
  forward = _forward()
  gen, _ = _dense()
  logits, caches = gen.prefill(TOKENS[:, :40], LENGTHS)
  full = forward(_padded([TOKENS[b, :n] for b, n in enumerate(LENGTHS)]))
  np.testing.assert_allclose(logits, full[np.arange(3), LENGTHS - 1],
                             atol=2e-5)
  lens = LENGTHS.copy()
  for _ in range(2):
    logits, caches = gen.step(caches, TOKENS[np.arange(3), lens])
    lens += 1
    full = forward(_padded([TOKENS[b, :n] for b, n in enumerate(lens)]))
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
  _, want = _dense()
  calib = TOKENS[:2, :33] if name == "double_sparsity" else None
  got = generate.generate(MODEL, TOKENS[:, :40], LENGTHS, max_new_tokens=3,
                          method=name, max_len=SEQ, impl="xla",
                          calib_tokens=calib, **FULL[name])
  np.testing.assert_array_equal(got, want)


def test_moa_calibration_profiles_spans_under_the_budget():
  # (Double Sparsity's calibration runs in the full-budget test above.)
  m = methods.get_method("moa", density_budget=0.5, min_span=8, block=8,
                         sink_size=4).calibrate(MODEL, TOKENS[:2, :33])
  assert len(m.spans) == 2 and m.spans[0].num_kv_heads == 2
  assert np.mean([s.density(32) for s in m.spans]) <= 0.5 + 1e-9


def test_moa_influence_with_a_loss_mask_comes_from_the_masked_targets():
  toks = jnp.asarray(TOKENS[:2, :17])
  mask = np.zeros((2, 16), np.float32)
  mask[:, 9] = 1.0  # the loss of target 9 only: queries <= 9 can matter
  infl = moa_profile.layer_influence(MODEL, toks, mask)
  for e in infl:
    assert np.all(e[:, 10:] == 0.0) and np.abs(e[:, :10]).max() > 0
  # All ones is the unmasked mean; the masked profile differs from it.
  ones = moa_profile.layer_influence(MODEL, toks, np.ones((2, 16)))
  plain = moa_profile.layer_influence(MODEL, toks)
  for a, b, c in zip(ones, plain, infl):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    assert not np.allclose(c, b)
  with pytest.raises(ValueError, match=r"loss_mask must be \[batch, length - 1\]"):
    moa_profile.layer_influence(MODEL, toks, np.ones((2, 17)))
  with pytest.raises(ValueError, match="not all zero"):
    moa_profile.layer_influence(MODEL, toks, np.zeros((2, 16)))


def test_moa_calibration_with_a_loss_mask_meets_the_budget():
  mask = np.zeros((2, 32), np.float32)
  mask[:, -2:] = 1.0  # answers at the end, as in the needle task
  m = methods.get_method("moa", density_budget=0.5, min_span=8, block=8,
                         sink_size=4).calibrate(MODEL, TOKENS[:2, :33], mask)
  assert len(m.spans) == 2
  assert np.mean([s.density(32) for s in m.spans]) <= 0.5 + 1e-9
  with pytest.raises(ValueError, match="calib_loss_mask needs calib_tokens"):
    generate.Generator(MODEL, "moa", batch=1, max_len=SEQ,
                       calib_loss_mask=mask)


def test_generator_rejects_bad_prompts_and_layer_variants():
  gen = generate.Generator(MODEL, "dense", batch=3, max_len=SEQ)
  with pytest.raises(ValueError, match="lengths must be"):
    gen.prefill(TOKENS[:, :40], np.array([41, 1, 1]))
  with pytest.raises(ValueError, match="exceeds max_len"):
    gen.prefill(np.zeros((3, SEQ + 1), np.int32), LENGTHS)
  with pytest.raises(ValueError, match="options are for a method"):
    generate.Generator(MODEL, methods.get_method("dense"), batch=1,
                       max_len=8, impl="xla")


def test_the_generate_module_is_not_shadowed():
  # The package once exported generate(), hiding this module from
  # `from sparsejax.inference import generate` (experiments/generate.py).
  import sparsejax.inference as inf  # pylint: disable=g-import-not-at-top
  assert inf.generate is generate and callable(generate.generate)
  assert inf.Generator is generate.Generator


def test_generate_cli_parses_method_options():
  from experiments import generate as cli  # pylint: disable=g-import-not-at-top
  assert cli.parse_options(["token_budget=256", "per_head=True",
                            "impl=xla"]) == dict(token_budget=256,
                                                 per_head=True, impl="xla")
  with pytest.raises(ValueError, match="key=value"):
    cli.parse_options(["token_budget"])
