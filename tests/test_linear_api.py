"""sj.linear: bad inputs, implementation selection and the slope recipes."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax.linear import vjp

L = sj.linear


def _qkv(b=1, t=8, h=2, d=4, e=6):
  q = jnp.ones((b, t, h, d))
  return q, q, jnp.ones((b, t, h, e))


@pytest.mark.parametrize("slopes,match", [
    (jnp.array([0.1, -0.5]), "slopes must be >= 0"),
    (jnp.array([0.1, jnp.nan]), "slopes must be finite"),
    (jnp.array([0.1, jnp.inf]), "slopes must be finite"),
    (jnp.array([0.1, 0.2, 0.3]), r"slopes must be \[heads=2\]"),
    (jnp.array([1, 2]), "slopes must be floating"),
])
def test_bad_slopes(slopes, match):
  q, k, v = _qkv()
  with pytest.raises((ValueError, TypeError), match=match):
    L.lightning_attention(q, k, v, slopes)
  with pytest.raises((ValueError, TypeError), match=match):
    L.lightning_decode(q[:, 0], k[:, 0], v[:, 0], jnp.zeros((1, 2, 4, 6)),
                       slopes)


@pytest.mark.parametrize("state,match", [
    (jnp.zeros((1, 2, 6, 4)), r"initial_state must be \[batch, heads, d_k, "
                              r"d_v\] = \(1, 2, 4, 6\)"),
    (jnp.zeros((1, 2, 4, 6), jnp.bfloat16), "must be float32"),
    (np.zeros((2, 4, 6), np.float32), "initial_state must be"),
])
def test_bad_initial_state(state, match):
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=match):
    L.lightning_attention(q, k, v, jnp.zeros(2), initial_state=state)


def test_bad_shapes_and_dtypes():
  q, k, v = _qkv()
  s = jnp.zeros(2)
  with pytest.raises(ValueError, match="k must have q's shape"):
    L.lightning_attention(q, k[:, :5], v, s)
  with pytest.raises(ValueError, match="k must have q's shape"):
    L.lightning_attention(q, jnp.ones((1, 8, 3, 4)), v, s)
  with pytest.raises(ValueError, match=r"v must be \[batch=1, T=8, heads=2"):
    L.lightning_attention(q, k, v[:, :7], s)
  with pytest.raises(ValueError, match="q must be a rank-4"):
    L.lightning_attention(q[0], k, v, s)
  with pytest.raises(TypeError, match="share a dtype"):
    L.lightning_attention(q.astype(jnp.bfloat16), k, v, s)
  with pytest.raises(TypeError, match="q must be float32"):
    L.lightning_attention(q.astype(jnp.int32), k, v, s)
  with pytest.raises(ValueError, match="at least one token"):
    L.lightning_attention(q[:, :0], k[:, :0], v[:, :0], s)
  with pytest.raises(ValueError, match="scale must be a finite"):
    L.lightning_attention(q, k, v, s, scale=float("nan"))
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    L.lightning_attention(q, k, v, s, chunk_size=0)
  with pytest.raises(ValueError, match="impl must be one of"):
    L.lightning_attention(q, k, v, s, impl="flash")
  with pytest.raises(ValueError, match="interpret=True needs a Pallas"):
    L.lightning_attention(q, k, v, s, impl="xla", interpret=True)
  with pytest.raises(ValueError, match="needs a CUDA GPU"):
    L.lightning_attention(q, k, v, s, impl="pallas_triton")


def test_bad_decode_inputs():
  q, k, v = (x[:, 0] for x in _qkv())
  s = jnp.zeros(2)
  state = jnp.zeros((1, 2, 4, 6))
  with pytest.raises(ValueError, match=r"state must be \[batch, heads"):
    L.lightning_decode(q, k, v, state[..., :5], s)
  with pytest.raises(ValueError, match="state must be float32"):
    L.lightning_decode(q, k, v, state.astype(jnp.float16), s)
  with pytest.raises(ValueError, match=r"v must be \[batch=1, heads=2"):
    L.lightning_decode(q, k, v[:, :1], state, s)
  with pytest.raises(ValueError, match="q must be a rank-3"):
    L.lightning_decode(q[None], k, v, state, s)


def test_traced_slopes_are_not_checked_but_run():
  q, k, v = _qkv()
  f = jax.jit(lambda s: L.lightning_attention(q, k, v, s, impl="xla"))
  assert f(jnp.zeros(2)).shape == (1, 8, 2, 6)


def test_auto_picks_per_platform(caplog):
  problem = (jnp.bfloat16, 128, 128, None, False)
  assert L.REGISTRY.resolve("auto", False, problem).name == "xla"
  with sj.target_platform("gpu", "NVIDIA H200"):
    assert L.REGISTRY.resolve("auto", False, problem).name == "pallas_triton"
    with caplog.at_level(logging.INFO):
      big = L.REGISTRY.resolve("auto", False,
                               (jnp.bfloat16, 512, 128, None, False))
    assert big.name == "xla" and "d_k, d_v <= 256" in caplog.text
    with pytest.raises(ValueError, match="chunk_size a power of two"):
      L.REGISTRY.resolve("pallas_triton", False,
                         (jnp.float32, 64, 64, 24, False))
    assert L.DECODE_REGISTRY.resolve("auto", False, problem[:3]).name == (
        "pallas_triton")
  with sj.target_platform("tpu", "TPU v5e"):
    assert L.REGISTRY.resolve("auto", False, problem).name == "pallas_tpu"
    # A chunk the TPU tiling rejects: auto falls back, interpret accepts it.
    assert L.REGISTRY.resolve("auto", False, (jnp.float32, 64, 64, 64,
                                              False)).name == "xla"
    assert L.REGISTRY.resolve("pallas_tpu", True, (jnp.float32, 64, 64, 16,
                                                   True)).name == "pallas_tpu"


def test_alibi_slopes():
  np.testing.assert_allclose(L.alibi_slopes(8), 2.0 ** -np.arange(1, 9))
  # Not a power of two: the ALiBi interleave (Press et al.).
  want6 = np.concatenate([2.0 ** (-2.0 * np.arange(1, 5)),
                          2.0 ** -np.array([1.0, 3.0])])
  np.testing.assert_allclose(L.alibi_slopes(6), want6, rtol=1e-6)
  assert L.alibi_slopes(64)[-1] == np.float32(2.0 ** -8)
  with pytest.raises(ValueError, match="num_heads"):
    L.alibi_slopes(0)


def test_minimax_and_fla_rules_differ():
  base = L.alibi_slopes(8)
  np.testing.assert_allclose(L.minimax_slopes(8, 0, 10), base * (1 + 1e-5),
                             rtol=1e-6)
  np.testing.assert_allclose(L.minimax_slopes(8, 9, 10), base * 1e-5,
                             rtol=1e-5)
  np.testing.assert_allclose(L.minimax_slopes(8, 0, 1), base * (1 + 1e-5),
                             rtol=1e-6)
  fla = L.fla_lightning_slopes(8, 0, 10)
  np.testing.assert_allclose(fla, np.arange(8.0))  # (8/H)(1 - 0) h
  np.testing.assert_allclose(L.fla_lightning_slopes(8, 5, 10),
                             0.5 * np.arange(8.0))
  assert fla[0] == 0.0 and L.minimax_slopes(8, 0, 10)[0] > 0.5
  with pytest.raises(ValueError, match="layer must be"):
    L.minimax_slopes(8, 10, 10)
  with pytest.raises(ValueError, match="decay must be one of"):
    L.decay_slopes("retnet", 8, 0, 2)
  np.testing.assert_array_equal(L.decay_slopes("none", 3, 0, 1), 0.0)


def test_split_plan():
  # Enough programs for the SMs, never shorter than the minimum split.
  assert vjp.choose_splits(256, 32, num_sms=132) in (4, 8)
  assert vjp.choose_splits(256, 1024, num_sms=132) == 1
  assert vjp.choose_splits(7, 2, num_sms=132, min_chunks_per_split=8) == 1
  plan = vjp.make_plan(1000, 64, 5, scale=1.0, has_initial_state=False,
                       want_final_state=False)
  assert plan.split % 64 == 0 and plan.num_splits * plan.split >= 1000
  assert (plan.num_splits - 1) * plan.split < 1000
