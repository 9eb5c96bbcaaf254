"""One suite, run against every implementation (see test_attention_impls.py).

Each case checks output, lse and the gradients of q, k, v (with random
cotangents for both the output and the lse) against the dense f32 reference.
"""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from tests.attention_cases import CASES, CASES_BY_NAME, Case

# (rtol, atol) on values normalised by the reference's max magnitude.
TOLERANCES = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


def _inputs(case: Case, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (case.batch, case.q_len, case.heads,
                                case.head_dim), dtype)
  k = jax.random.normal(ks[1], (case.batch, case.kv_len, case.kv_heads,
                                case.head_dim), dtype)
  v = jax.random.normal(ks[2], k.shape, dtype)
  do = jax.random.normal(ks[3], q.shape, dtype)
  dlse = jax.random.normal(ks[4], (case.batch, case.heads, case.q_len))
  return q, k, v, do, dlse


def run(q, k, v, do, dlse, mask, soft_cap, **kw):
  """(out, lse, dq, dk, dv) of attention with output and lse cotangents."""
  f = lambda q, k, v: sj.attention(q, k, v, mask, soft_cap=soft_cap,
                                   return_lse=True, **kw)
  (out, lse), vjp = jax.vjp(f, q, k, v)
  dlse = jnp.where(jnp.isfinite(lse), dlse, 0.0)
  return (out, lse) + vjp((do, dlse))


def assert_close(name, got, want, tol):
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  finite = np.isfinite(want)
  np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=name)
  scale = max(1.0, float(np.abs(want[finite]).max(initial=0.0)))
  err = float(np.abs(got[finite] - want[finite]).max(initial=0.0)) / scale
  assert err <= tol, f"{name}: normalised max error {err:.3g} > {tol:.3g}"


def check_case(impl_kw, case: Case, dtype, seed=0):
  q, k, v, do, dlse = _inputs(case, dtype, seed)
  mask = case.make_mask()
  want = run(q, k, v, do, dlse, mask, case.soft_cap, impl="reference")
  got = run(q, k, v, do, dlse, mask, case.soft_cap, **impl_kw)
  tol = TOLERANCES[dtype]
  for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
    assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
    assert_close(name, g, w, tol)
  return got, mask


def draw_random_block_case(data, block_sizes, head_dim):
  """A Hypothesis-drawn random block pattern, ragged lengths, GQA and element
  mask (none, random or causal with an offset); returns (case, seed)."""
  nq = data.draw(st.integers(1, 4), label="nq")
  nk = data.draw(st.integers(1, 4), label="nk")
  bs = data.draw(st.sampled_from(block_sizes), label="block")
  q_len = data.draw(st.integers((nq - 1) * bs + 1, nq * bs), label="q_len")
  kv_len = data.draw(st.integers((nk - 1) * bs + 1, nk * bs), label="kv_len")
  kv_heads = data.draw(st.sampled_from([1, 2]), label="kv_heads")
  heads = kv_heads * data.draw(st.sampled_from([1, 2]), label="group")
  bits = data.draw(st.lists(st.booleans(), min_size=heads * nq * nk,
                            max_size=heads * nq * nk), label="blocks")
  blocks = np.array(bits).reshape(1, heads, nq, nk)
  seed = data.draw(st.integers(0, 50), label="seed")
  fn = data.draw(st.sampled_from(
      [None, sj.mask_fns.HashedRandom(seed, 1, 2),
       sj.mask_fns.Causal(data.draw(st.integers(-8, 8), label="offset"))]),
                 label="mask_fn")
  mask = sj.masks.from_block_mask(blocks, block_size=bs, q_len=q_len,
                                  kv_len=kv_len, mask_fn=fn)
  return Case("random", 1, q_len, kv_len, heads, kv_heads, head_dim,
              lambda: mask), seed


class AttentionSuite:
  """Subclass with IMPL (and INTERPRET) set to run the suite."""
  IMPL: str = ""
  INTERPRET: bool = False

  @property
  def kw(self):
    kw = {"impl": self.IMPL}
    if self.INTERPRET:
      kw["interpret"] = True
    return kw

  @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
  def test_matches_reference_f32(self, case):
    check_case(self.kw, case, jnp.float32)

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                           ids=["bf16", "fp16"])
  @pytest.mark.parametrize("name", ["causal_ragged_gqa_d48", "s2_gqa"])
  def test_matches_reference_low_precision(self, name, dtype):
    check_case(self.kw, CASES_BY_NAME[name], dtype)

  def test_fully_masked_rows_are_zero_with_zero_grads(self):
    (out, lse, dq, dk, dv), mask = check_case(
        self.kw, CASES_BY_NAME["fully_masked_rows"], jnp.float32)
    dead = ~np.asarray(mask.to_dense()).any(-1)[0, 0]  # [q_len]
    assert dead.sum() >= 20
    assert np.all(np.asarray(out)[:, dead] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[:, :, dead]))
    assert np.all(np.asarray(dq)[:, dead] == 0)
    for g in (out, dq, dk, dv):
      assert np.isfinite(np.asarray(g)).all()

  def test_empty_block_row(self):
    (out, lse, *_), _ = check_case(self.kw, CASES_BY_NAME["empty_block_row"],
                                   jnp.float32)
    assert np.all(np.asarray(out)[:, 32:64] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[:, :, 32:64]))

  def test_deterministic(self):
    case = CASES_BY_NAME["s2_gqa"]
    q, k, v, do, dlse = _inputs(case, jnp.float32, seed=1)
    mask = case.make_mask()
    a = run(q, k, v, do, dlse, mask, None, **self.kw)
    b = run(q, k, v, do, dlse, mask, None, **self.kw)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  @hypothesis.given(st.data())
  def test_random_block_patterns(self, data):
    case, seed = draw_random_block_case(data, block_sizes=(16, 32),
                                        head_dim=16)
    check_case(self.kw, case, jnp.float32, seed=seed)
