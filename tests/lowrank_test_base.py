"""One Scatterbrain suite, run against every implementation.

Each case checks the output and the gradients of q, k and v (random
cotangent) against the float64 reference (`scatterbrain_reference` under
x64), plus the two corner cases that pin the semantics: an empty support is
Performer attention, a full support exact softmax attention.

Tolerances are on values normalised by the reference's max magnitude. f32
is 5e-5, not the core's 2e-5: the low-rank mass outside the support is a
difference of two f32 sums (sum over A(i) minus sum over S(i), the
algorithm's own form), whose rounding, relative to that sum, shows where the
support covers nearly all of A(i) (e.g. the first row past a causal
window).
"""

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax import lowrank

TOLERANCES = {"float32": 5e-5, "bfloat16": 3e-2, "float16": 1e-2}


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
  num_features: int
  causal: bool
  make_mask: Callable[[], Optional[sj.BlockMask]]


def _random_blocks(q_len, kv_len, heads, seed, block=16):
  nq, nk = -(-q_len // block), -(-kv_len // block)
  blocks = np.random.default_rng(seed).random((1, heads, nq, nk)) < 0.5
  return sj.masks.from_block_mask(
      blocks, block_size=block, q_len=q_len, kv_len=kv_len,
      mask_fn=sj.mask_fns.HashedRandom(seed, 2, 3))


CASES = [
    Case("bidir_window_ragged_gqa", 1, 40, 40, 4, 2, 16, 16, False,
         lambda: sj.masks.sliding_window(40, 10, causal=False,
                                         block_size=16)),
    Case("causal_window_ragged", 2, 45, 45, 2, 1, 16, 16, True,
         lambda: sj.masks.sliding_window(45, 12, block_size=16)),
    Case("causal_more_keys_gqa", 1, 30, 45, 2, 1, 24, 12, True,
         lambda: sj.masks.sliding_window(30, 8, kv_len=45, block_size=16)),
    Case("bidir_random_blocks_per_head", 1, 40, 56, 2, 2, 16, 16, False,
         lambda: _random_blocks(40, 56, 2, seed=3)),
    Case("causal_s2_blocks32", 1, 64, 64, 2, 2, 32, 32, True,
         lambda: sj.masks.s2(64, 2, block_size=32, local_blocks=1,
                             vert_stride=2)),
]
CASES_BY_NAME = {c.name: c for c in CASES}


def inputs(case: Case, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (case.batch, case.q_len, case.heads,
                                case.head_dim), dtype)
  k = jax.random.normal(ks[1], (case.batch, case.kv_len, case.kv_heads,
                                case.head_dim), dtype)
  v = jax.random.normal(ks[2], k.shape, dtype)
  do = jax.random.normal(ks[3], q.shape, dtype)
  w = lowrank.orthogonal_gaussian_projection(ks[4], case.num_features,
                                             case.head_dim)
  return q, k, v, do, w


def with_grads(f, q, k, v, do):
  out, vjp = jax.vjp(f, q, k, v)
  return (out,) + vjp(do)


@functools.lru_cache(maxsize=None)
def _reference_f64(case_name, dtype_name, seed, causal, masked=True):
  case = dataclasses.replace(CASES_BY_NAME[case_name], causal=causal)
  q, k, v, do, w = inputs(case, jnp.dtype(dtype_name), seed)
  mask = case.make_mask() if masked else None
  with x64():
    f = lambda q, k, v, do: with_grads(
        lambda q, k, v: lowrank.scatterbrain_reference(
            q, k, v, mask, w.astype(jnp.float64), causal=causal,
            scale=q.shape[-1] ** -0.5), q, k, v, do)
    got = jax.jit(f)(*(jnp.asarray(np.asarray(x, np.float64))
                       for x in (q, k, v, do)))
    return tuple(np.asarray(x) for x in got)


def reference_f64(case: Case, dtype, seed=0):
  """(out, dq, dk, dv) of the definition in float64 for `inputs(case, dtype,
  seed)`, as numpy (cached: every implementation's class shares them)."""
  return _reference_f64(case.name, jnp.dtype(dtype).name, seed, case.causal)


def assert_close(name, got, want, tol):
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  assert np.isfinite(got).all(), f"{name}: non-finite values"
  scale = max(1.0, float(np.abs(want).max(initial=0.0)))
  err = float(np.abs(got - want).max(initial=0.0)) / scale
  assert err <= tol, f"{name}: normalised max error {err:.3g} > {tol:.3g}"


class ScatterbrainSuite:
  """Subclass with IMPL (and INTERPRET) set to run the suite.

  The class attributes pick how much of the suite runs (interpret mode is
  slow on CPU; the xla class runs all of it): CASE_NAMES (f32 cases),
  LOW_PRECISION (dtypes), CORNERS (causal values of the corner cases) and
  EMPTY_MASKS ("explicit" empty BlockMask, None).
  """
  IMPL: str = ""
  INTERPRET: bool = False
  CASE_NAMES = ("causal_more_keys_gqa", "bidir_random_blocks_per_head",
                "causal_s2_blocks32")
  LOW_PRECISION = ("bfloat16", "float16")
  CORNERS = (False, True)
  EMPTY_MASKS = ("explicit",)
  LOW_PRECISION_CASE = "causal_window_ragged"

  def pytest_generate_tests(self, metafunc):
    table = {"case_name": self.CASE_NAMES, "low_dtype": self.LOW_PRECISION,
             "causal": self.CORNERS}
    for arg, values in table.items():
      if arg in metafunc.fixturenames:
        metafunc.parametrize(arg, values)

  @property
  def kw(self):
    kw = {"impl": self.IMPL}
    if self.INTERPRET:
      kw["interpret"] = True
    return kw

  def run(self, case, q, k, v, do, w, mask):
    f = lambda q, k, v, do: with_grads(
        lambda q, k, v: lowrank.scatterbrain_attention(
            q, k, v, mask, w, causal=case.causal, **self.kw), q, k, v, do)
    return jax.jit(f)(q, k, v, do)

  def check(self, case: Case, dtype, seed=0):
    """Output and gradients of `case` against the f64 reference."""
    q, k, v, do, w = inputs(case, dtype, seed)
    want = reference_f64(case, dtype, seed)
    got = self.run(case, q, k, v, do, w, case.make_mask())
    for name, g, x, wnt in zip(("out", "dq", "dk", "dv"), got, (q, q, k, v),
                               want):
      assert g.dtype == x.dtype, (name, g.dtype, x.dtype)
      assert_close(f"{case.name}: {name}", g, wnt, TOLERANCES[jnp.dtype(dtype).name])
    return got

  def test_matches_f64_reference(self, case_name):
    self.check(CASES_BY_NAME[case_name], jnp.float32)

  def test_low_precision(self, low_dtype):
    self.check(CASES_BY_NAME[self.LOW_PRECISION_CASE], jnp.dtype(low_dtype))

  def test_empty_support_is_performer(self, causal):
    """No support: Performer alone (the public op and the f64 definition);
    an explicit empty mask and mask=None agree. No NaN anywhere."""
    case = dataclasses.replace(CASES_BY_NAME["causal_more_keys_gqa"],
                               causal=causal)
    q, k, v, do, w = inputs(case, jnp.float32, seed=1)
    perf = jax.jit(lambda q, k, v, do: with_grads(
        lambda q, k, v: lowrank.performer_attention(q, k, v, w,
                                                    causal=causal),
        q, k, v, do))(q, k, v, do)
    want = _reference_f64(case.name, "float32", 1, causal, masked=False)
    masks = {"explicit": lowrank.empty_support(case.q_len, case.kv_len,
                                               block_size=(16, 16)),
             "none": None}
    for key in self.EMPTY_MASKS:
      got = self.run(case, q, k, v, do, w, masks[key])
      for name, g, p, wnt in zip(("out", "dq", "dk", "dv"), got, perf, want):
        assert_close(f"{key}: {name}", g, wnt, TOLERANCES["float32"])
        assert_close(f"{key}: {name} vs performer_attention", g, p,
                     TOLERANCES["float32"])

  def test_full_support_is_softmax(self, causal):
    """Support = A(i): exact softmax attention (sj.attention_reference),
    gradients included; the low-rank terms cancel."""
    case = dataclasses.replace(CASES_BY_NAME["bidir_window_ragged_gqa"],
                               causal=causal)
    q, k, v, do, w = inputs(case, jnp.float32, seed=2)
    build = sj.masks.causal if causal else sj.masks.full
    mask = build(case.q_len, case.kv_len, block_size=16)
    got = self.run(case, q, k, v, do, w, mask)
    exact = jax.jit(lambda q, k, v, do: with_grads(
        lambda q, k, v: sj.attention_reference(
            q, k, v, mask, scale=case.head_dim ** -0.5)[0],
        q, k, v, do))(q, k, v, do)
    for name, g, wnt in zip(("out", "dq", "dk", "dv"), got, exact):
      assert_close(name, g, wnt, TOLERANCES["float32"])
