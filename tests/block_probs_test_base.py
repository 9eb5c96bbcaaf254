"""One suite for `sj.learned.block_attention_probs`, run against every
implementation (see test_learned_block_probs.py).

Each case checks the pooled probabilities and the gradients of q and k (with
a random cotangent) against the dense reference evaluated in float64.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj

TOLERANCES = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def x64():
  """A float64 context (jax.enable_x64; jax.experimental's before it)."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
  return enable_x64()


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  batch: int
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  head_dim: int
  block: int
  causal: bool = True
  normalize: bool = True


CASES = [
    Case("causal_ragged_gqa", 2, 70, 70, 4, 2, 16, 16),
    Case("causal_block32_d48_ragged", 1, 100, 100, 2, 2, 48, 32),
    Case("noncausal_cross_mqa", 1, 40, 72, 2, 1, 32, 16, causal=False),
    Case("causal_q_longer_than_kv", 1, 64, 40, 2, 2, 16, 16),
    # One ragged block: normalised it is 1, so check the raw maximum
    # (bidirectional: causally row 0 alone would give an exact 1).
    Case("single_ragged_block_raw", 1, 11, 11, 1, 1, 16, 16, causal=False,
         normalize=False),
]
BY_NAME = {c.name: c for c in CASES}


def normal(seed, shape, dtype=jnp.float32):
  """Standard normal test data from numpy: eager jax.random compiles its
  kernels for every new shape (seconds each on a busy CPU)."""
  x = np.random.default_rng(seed).standard_normal(shape, np.float32)
  return jnp.asarray(x).astype(dtype)


def inputs(case: Case, dtype, seed=0):
  q = normal(3 * seed, (case.batch, case.q_len, case.heads, case.head_dim))
  k = normal(3 * seed + 1, (case.batch, case.kv_len, case.kv_heads,
                            case.head_dim))
  nq, nk = -(-case.q_len // case.block), -(-case.kv_len // case.block)
  g = normal(3 * seed + 2, (case.batch, case.heads, nq, nk))
  return q.astype(dtype), k.astype(dtype), g


@functools.lru_cache(maxsize=None)
def _jitted(fn, case, kw_items):
  kw = dict(kw_items)
  f = lambda q, k: fn(q, k, block_size=case.block, causal=case.causal,
                      normalize=case.normalize, **kw)

  @jax.jit
  def go(q, k, g):
    probs, vjp = jax.vjp(f, q, k)
    return (probs,) + vjp(g.astype(probs.dtype))

  return go


def run(q, k, g, case, fn=None, **kw):
  """(probs, dq, dk) with cotangent g (one compile per case and settings)."""
  fn = fn or sj.learned.block_attention_probs
  return _jitted(fn, case, tuple(sorted(kw.items())))(q, k, g)


def reference64(q, k, g, case):
  with x64():
    q64 = jnp.asarray(np.asarray(q, np.float64))
    k64 = jnp.asarray(np.asarray(k, np.float64))
    g64 = jnp.asarray(np.asarray(g, np.float64))
    out = run(q64, k64, g64, case,
              fn=sj.learned.block_attention_probs_reference)
    return [np.asarray(x) for x in out]


def assert_close(name, got, want, tol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  assert np.isfinite(got).all(), name
  scale = max(1e-6, float(np.abs(want).max()))
  err = float(np.abs(got - want).max()) / scale
  assert err <= tol, f"{name}: normalised max error {err:.3g} > {tol:.3g}"


def check_case(kw, case: Case, dtype, seed=0, grads=True):
  """Values (and, with grads, dq and dk) against the float64 reference."""
  q, k, g = inputs(case, dtype, seed)
  want = reference64(q, k, g, case)
  if not grads:
    got = jax.jit(lambda q, k: sj.learned.block_attention_probs(
        q, k, block_size=case.block, causal=case.causal,
        normalize=case.normalize, **kw))(q, k)
    assert_close("probs", got, want[0], TOLERANCES[dtype])
    return (got,)
  got = run(q, k, g, case, **kw)
  for name, x, w in zip(("probs", "dq", "dk"), got, want):
    assert_close(name, x, w, TOLERANCES[dtype])
  return got


class BlockProbsSuite:
  """Subclass with IMPL (and INTERPRET) set to run the suite.

  Interpret-mode classes check gradients on GRAD_CASES only (None: all):
  the backward is the same code for every implementation (the shared
  custom_vjp around the core's attention backward), so elsewhere they check
  their own forward kernel's values; SLOW_CASES (case names, "bf16" or
  "structure") are skipped where an interpreter is too slow for CI.
  """
  IMPL: str = ""
  INTERPRET: bool = False
  GRAD_CASES = None
  SLOW_CASES: frozenset = frozenset()

  @property
  def kw(self):
    kw = {"impl": self.IMPL}
    if self.INTERPRET:
      kw["interpret"] = True
    return kw

  @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
  def test_matches_float64_reference(self, case):
    if case.name in self.SLOW_CASES:
      pytest.skip(f"slow under {self.IMPL} interpret mode; the same code "
                  "path runs in the other cases")
    grads = self.GRAD_CASES is None or case.name in self.GRAD_CASES
    check_case(self.kw, case, jnp.float32, grads=grads)

  def test_bf16(self):
    if "bf16" in self.SLOW_CASES:
      pytest.skip(f"slow under {self.IMPL} interpret mode")
    check_case(self.kw, BY_NAME["causal_ragged_gqa"], jnp.bfloat16,
               grads=self.GRAD_CASES is None)

  def test_structure_and_determinism(self):
    """Unnormalised maxima are probabilities (<= 1; block (0, 0) holds row
    0, whose only key gives exactly 1), causal blocks above the diagonal
    are exactly 0, and two calls agree bit for bit."""
    if "structure" in self.SLOW_CASES:
      pytest.skip(f"slow under {self.IMPL} interpret mode; the xla and "
                  "Triton classes check the structure")
    case = BY_NAME["causal_ragged_gqa"]
    q, k, _ = inputs(case, jnp.float32, seed=3)
    f = jax.jit(lambda q, k: sj.learned.block_attention_probs(
        q, k, block_size=case.block, normalize=False, **self.kw))
    raw = np.asarray(f(q, k))
    assert raw.max() <= 1.0 + 1e-6 and raw.min() >= 0.0
    np.testing.assert_allclose(raw[..., 0, 0], 1.0, rtol=1e-6)
    upper = np.triu(np.ones(raw.shape[2:], bool), 1)
    assert np.all(raw[..., upper] == 0)
    assert np.all(raw[..., ~upper] > 0)
    np.testing.assert_array_equal(raw, np.asarray(f(q, k)))
