"""One suite, run against every implementation (see test_attention_impls.py).

Each case checks output, lse and the gradients of q, k, v and of the score
mod's parameters (with random cotangents for both the output and the lse)
against the dense reference evaluated in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import hypothesis
from hypothesis import strategies as st

import sparsejax as sj
from tests.attention_cases import CASES, CASES_BY_NAME, MOD_CASES, Case

# (rtol, atol) on values normalised by the reference's max magnitude.
TOLERANCES = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


def _inputs(case: Case, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(ks[0], (case.batch, case.q_len, case.heads,
                                case.head_dim), dtype)
  k = jax.random.normal(ks[1], (case.batch, case.kv_len, case.kv_heads,
                                case.head_dim), dtype)
  v = jax.random.normal(ks[2], k.shape, dtype)
  do = jax.random.normal(ks[3], q.shape, dtype)
  dlse = jax.random.normal(ks[4], (case.batch, case.heads, case.q_len))
  mod = case.make_mod(ks[5]) if case.make_mod else None
  return q, k, v, do, dlse, mod


def _segment_kw(case: Case):
  if case.make_segments is None:
    return {}
  q_ids, kv_ids = case.make_segments()
  return {"q_segment_ids": jnp.asarray(q_ids),
          "kv_segment_ids": jnp.asarray(kv_ids)}


def run(q, k, v, do, dlse, mask, soft_cap, mod=None, **kw):
  """(out, lse, dq, dk, dv[, dmod]) with output and lse cotangents.

  Jitted as a whole: one compile is several times cheaper on CPU than
  dispatching the implementation's ops one by one.
  """
  def grads(q, k, v, do, dlse, mod):
    f = lambda q, k, v, m: sj.attention(q, k, v, mask, soft_cap=soft_cap,
                                        score_mod=m, return_lse=True, **kw)
    (out, lse), vjp = jax.vjp(f, q, k, v, mod)
    g = vjp((do, jnp.where(jnp.isfinite(lse), dlse, 0.0)))
    return (out, lse) + g[:3] + ((g[3],) if mod is not None else ())

  return jax.jit(grads)(q, k, v, do, dlse, mod)


def _x64():
  """The float64 context on jax 0.10 (jax.enable_x64) and older spellings."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
  return enable_x64()


def run_f64(q, k, v, do, dlse, mask, soft_cap, mod=None, q_segment_ids=None,
            kv_segment_ids=None):
  """`run` of the dense reference in float64 (numpy results)."""
  with _x64():
    f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    args = [f64(x) for x in (q, k, v, do, dlse)]
    mod = jax.tree.map(f64, mod)

    def grads(q, k, v, do, dlse, mod):
      f = lambda q, k, v, m: sj.attention_reference(
          q, k, v, mask, scale=q.shape[-1] ** -0.5, soft_cap=soft_cap,
          score_mod=m, q_segment_ids=q_segment_ids,
          kv_segment_ids=kv_segment_ids)
      (out, lse), vjp = jax.vjp(f, q, k, v, mod)
      g = vjp((do, jnp.where(jnp.isfinite(lse), dlse, 0.0)))
      return (out, lse) + g[:3] + ((g[3],) if mod is not None else ())

    return jax.tree.map(np.asarray, jax.jit(grads)(*args, mod))


def assert_close(name, got, want, tol):
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  finite = np.isfinite(want)
  np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=name)
  scale = max(1.0, float(np.abs(want[finite]).max(initial=0.0)))
  err = float(np.abs(got[finite] - want[finite]).max(initial=0.0)) / scale
  assert err <= tol, f"{name}: normalised max error {err:.3g} > {tol:.3g}"


NAMES = ("out", "lse", "dq", "dk", "dv", "dmod")


def check_case(impl_kw, case: Case, dtype, seed=0):
  """Compares impl_kw's attention with the float64 reference on `case`;
  returns ((out, lse, dq, dk, dv[, dmod]), mask)."""
  q, k, v, do, dlse, mod = _inputs(case, dtype, seed)
  mask = case.make_mask()
  seg = _segment_kw(case)
  want = run_f64(q, k, v, do, dlse, mask, case.soft_cap, mod, **seg)
  got = run(q, k, v, do, dlse, mask, case.soft_cap, mod, **seg, **impl_kw)
  tol = TOLERANCES[dtype]
  for name, g, w in zip(NAMES, got, want):
    for gl, wl in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      want_dtype = jnp.float32 if name in ("lse", "dmod") else dtype
      assert gl.dtype == want_dtype, (name, gl.dtype, want_dtype)
      assert_close(name, gl, wl, tol)
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
  """Subclass with IMPL (and INTERPRET) set to run the suite.

  UNSUPPORTED: {case name: reason regex} of cases this implementation
  refuses: the explicit impl must raise a ValueError saying why.
  """
  IMPL: str = ""
  INTERPRET: bool = False
  UNSUPPORTED: dict = {}

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

  @pytest.mark.parametrize("case", MOD_CASES, ids=lambda c: c.name)
  def test_mods_and_segments_match_reference(self, case):
    if case.name in self.UNSUPPORTED:
      with pytest.raises(ValueError, match=self.UNSUPPORTED[case.name]):
        check_case(self.kw, case, jnp.float32)
      return
    got, _ = check_case(self.kw, case, jnp.float32)
    if case.make_segments is not None:  # padded query rows see nothing
      q_ids = case.make_segments()[0]
      dead = q_ids < 0
      assert np.all(np.asarray(got[0])[dead] == 0)
      assert np.all(np.asarray(got[2])[dead] == 0)
      assert np.all(np.isneginf(np.asarray(got[1]).transpose(0, 2, 1)[dead]))

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
    """Two runs (one compile) give bit-identical results, the score mod's
    parameter gradients included (no atomics)."""
    name = next(n for n in ("relative_bias_s2_segments",
                            "alibi_softcap_causal_mqa")
                if n not in self.UNSUPPORTED)
    case = CASES_BY_NAME[name]
    q, k, v, do, dlse, mod = _inputs(case, jnp.float32, seed=1)
    mask, seg = case.make_mask(), _segment_kw(case)
    f = jax.jit(lambda *a: run(*a[:5], mask, case.soft_cap, a[5], **seg,
                               **self.kw))
    a = f(q, k, v, do, dlse, mod)
    b = f(q, k, v, do, dlse, mod)
    assert f._cache_size() == 1  # pylint: disable=protected-access
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  @hypothesis.given(st.data())
  def test_random_block_patterns(self, data):
    case, seed = draw_random_block_case(data, block_sizes=(16, 32),
                                        head_dim=16)
    check_case(self.kw, case, jnp.float32, seed=seed)
