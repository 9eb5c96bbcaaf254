"""sj.dot_product_attention against jax.nn.dot_product_attention, argument
by argument (float32 on CPU, outputs, residuals and gradients)."""

import logging

import jax
import jax.numpy as jnp
import pytest

import sparsejax as sj
from tests.attention_test_base import assert_close

B, T, S, N, K, H = 2, 40, 40, 4, 2, 16


def _arrays(t=T, s=S, n=N, k=K, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (B, t, n, H)),
          jax.random.normal(ks[1], (B, s, k, H)),
          jax.random.normal(ks[2], (B, s, k, H)),
          jax.random.normal(ks[3], (B, t, n, H)))


def _both(q, k, v, ct, extra=(), **kw):
  """(out, residual, grads) of jax.nn's and ours, jitted."""
  def make(fn):
    def f(q, k, v, *extra):
      def loss(q, k, v, *extra):
        out, res = fn(q, k, v, *extra, return_residual=True, **kw)
        return (out * ct.reshape(out.shape)).sum(), (out, res)
      grads, (out, res) = jax.grad(loss, argnums=tuple(range(3 + len(
          extra))), has_aux=True)(q, k, v, *extra)
      return out, res, grads
    return jax.jit(f)(q, k, v, *extra)
  return (make(jax.nn.dot_product_attention),
          make(sj.dot_product_attention))


def _check(want, got, tol=2e-5):
  for name, w, g in (("out", want[0], got[0]), ("residual", want[1], got[1])):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    assert_close(name, g, w, tol)
  for i, (w, g) in enumerate(zip(want[2], got[2])):
    assert_close(f"grad{i}", g, w, tol)


LENS = jnp.asarray([23, 40], jnp.int32)
CASES = {
    "plain": dict(),
    "scale": dict(scale=0.37),
    "causal": dict(is_causal=True),
    "window_tuple": dict(local_window_size=(9, 4)),
    "window_int_causal": dict(local_window_size=6, is_causal=True),
    "q_lengths_causal": dict(query_seq_lengths=LENS, is_causal=True),
    # Example 0 sees no key at all: jax.nn averages every value there.
    "kv_lengths_with_empty": dict(
        key_value_seq_lengths=jnp.asarray([0, 31], jnp.int32)),
    "both_lengths_window": dict(query_seq_lengths=LENS,
                                key_value_seq_lengths=LENS[::-1],
                                local_window_size=(5, 5)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_jax_nn(name):
  q, k, v, ct = _arrays()
  _check(*_both(q, k, v, ct, **CASES[name]))


@pytest.mark.parametrize("t,s,n,k,kw", [
    (24, 56, 4, 1, dict(is_causal=True)),        # cross lengths, MQA
    (56, 24, 2, 2, dict(is_causal=True,
                        local_window_size=(30, 0))),  # rows past the band
])
def test_cross_lengths_and_heads(t, s, n, k, kw):
  q, kk, v, ct = _arrays(t, s, n, k)
  _check(*_both(q, kk, v, ct, **kw))


def test_unbatched_layout():
  q, k, v, ct = _arrays()
  want, got = _both(q[0], k[0], v[0], ct[0], is_causal=True)
  assert got[0].shape == (T, N, H) and got[1].shape == (T, N)
  _check(want, got)


def test_dense_bias_and_mask_take_the_reference_path(caplog):
  q, k, v, ct = _arrays()
  bias = jax.random.normal(jax.random.key(5), (1, N, T, S))
  mask = jax.random.bernoulli(jax.random.key(6), 0.7, (B, 1, T, S))
  with caplog.at_level(logging.WARNING):
    _check(*_both(q, k, v, ct, (bias,), mask=mask, is_causal=True))
  assert "dense bias/mask" in caplog.text


@pytest.mark.parametrize("implementation", ["xla", "reference", None])
def test_implementation_names(implementation):
  q, k, v, ct = _arrays()
  kw = dict(is_causal=True, key_value_seq_lengths=LENS)
  want = jax.jit(lambda *a: jax.nn.dot_product_attention(*a, **kw))(q, k, v)
  got = jax.jit(lambda *a: sj.dot_product_attention(
      *a, implementation=implementation, **kw))(q, k, v)
  assert_close("out", got, want, 2e-5)


def test_cudnn_is_passed_through(monkeypatch):
  seen = {}

  def fake(*args, **kwargs):
    seen.update(kwargs)
    return args[0]

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  q, k, v, _ = _arrays()
  sj.dot_product_attention(q, k, v, implementation="cudnn", is_causal=True)
  assert seen["implementation"] == "cudnn" and seen["is_causal"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(implementation="flash"), "implementation must be one of"),
    (dict(query_seq_lengths=jnp.asarray([3.0, 4.0])),
     "query_seq_lengths dtype should be int32"),
    (dict(key_value_seq_lengths=jnp.asarray([3], jnp.int32)),
     "key_value_seq_lengths shape should be"),
])
def test_argument_errors_match_jax_nn(kwargs, match):
  q, k, v, _ = _arrays()
  with pytest.raises(ValueError, match=match):
    sj.dot_product_attention(q, k, v, **kwargs)


def test_dtype_mismatch_message_matches_jax_nn():
  q, k, v, _ = _arrays()
  with pytest.raises(ValueError) as want:
    jax.nn.dot_product_attention(q.astype(jnp.bfloat16), k, v)
  with pytest.raises(ValueError) as got:
    sj.dot_product_attention(q.astype(jnp.bfloat16), k, v)
  assert str(got.value) == str(want.value)
