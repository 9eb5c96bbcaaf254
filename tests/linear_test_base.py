"""One Lightning Attention-2 suite, run against every implementation
(subclasses in test_linear_impls.py, test_linear_tpu.py).

Every case checks o, the final state and the gradients of q, k, v, the
slopes and the initial state (random cotangents for o and the final state)
against the float64 recurrence evaluated on the same (dtype-rounded) inputs,
so only the implementation's error is measured.
"""

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj

# Normalised max error: |got - want| / max(1, max |want|).
TOLERANCES = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}
# The slope gradient sums many position-weighted terms (vjp.slope_grad).
SLOPE_TOLERANCES = {jnp.float32: 1e-4, jnp.bfloat16: 5e-2,
                    jnp.float16: 2e-2}
NAMES = ("o", "final_state", "dq", "dk", "dv", "dslopes", "dinitial_state")


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  batch: int
  seq: int
  heads: int
  d_k: int
  d_v: int
  slopes: Tuple[float, ...]
  initial_state: bool = True
  chunk: Optional[int] = 16
  scale: float = 1.0


CASES = [
    # T not a multiple of the chunk, d_k != d_v, no decay / mild / strong.
    Case("ragged_dk_ne_dv_state", 2, 77, 3, 16, 24, (0.0, 0.1, 3.0),
         scale=0.5),
    # Shorter than one chunk, no initial state, MiniMax-like slopes.
    Case("one_partial_chunk_no_state", 1, 11, 2, 16, 16, (0.5, 0.0625),
         initial_state=False),
]
BY_NAME = {c.name: c for c in CASES}


def x64():
  return jax.enable_x64(True)


def inputs(case: Case, dtype, seed=0):
  """Random q, k, v, slopes, initial state and cotangents (never zeros)."""
  ks = jax.random.split(jax.random.key(seed), 6)
  b, t, h, d, e = case.batch, case.seq, case.heads, case.d_k, case.d_v
  # q, k ~ 1/sqrt(d): state entries then stay O(sqrt(T)).
  q = (jax.random.normal(ks[0], (b, t, h, d)) * d ** -0.5).astype(dtype)
  k = (jax.random.normal(ks[1], (b, t, h, d)) * d ** -0.5).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, e)).astype(dtype)
  s0 = (jax.random.normal(ks[3], (b, h, d, e)) if case.initial_state
        else None)
  do = jax.random.normal(ks[4], (b, t, h, e)).astype(dtype)
  ds = jax.random.normal(ks[5], (b, h, d, e))
  return q, k, v, jnp.asarray(case.slopes, jnp.float32), s0, do, ds


def run(q, k, v, slopes, s0, do, ds, *, scale, final=True, **kw):
  """(o[, final], dq, dk, dv, dslopes[, ds0]) through one jitted vjp; with
  final=False the op returns o only (no final-state output or cotangent)."""
  def f(q, k, v, slopes, s0):
    return sj.linear.lightning_attention(
        q, k, v, slopes, scale=scale, initial_state=s0,
        return_final_state=final, **kw)

  @jax.jit
  def go(q, k, v, slopes, s0, do, ds):
    out, vjp = jax.vjp(f, q, k, v, slopes, s0)
    if not final:
      return (out,) + vjp(do)
    return out + vjp((do, ds))

  return go(q, k, v, slopes, s0, do, ds)


def _f64(x):
  return None if x is None else jnp.asarray(np.asarray(x, np.float32),
                                            jnp.float64)


@functools.partial(jax.jit, static_argnames="scale")
def _recurrence_vjp(q, k, v, slopes, s0, do, ds, *, scale):
  def f(q, k, v, slopes, s0):
    return sj.linear.lightning_recurrence(q, k, v, slopes, scale=scale,
                                          initial_state=s0)

  out, vjp = jax.vjp(f, q, k, v, slopes, s0)
  if do is None:
    return out
  if ds is None:  # no final-state cotangent
    ds = jnp.zeros_like(out[1])
  return out + vjp((do, ds))


def recurrence64(q, k, v, slopes, s0, do=None, ds=None, *, scale):
  """The float64 recurrence (and its vjp when cotangents are given) on the
  same inputs, as numpy arrays."""
  with x64():
    out = _recurrence_vjp(*[_f64(x) for x in (q, k, v, slopes, s0, do, ds)],
                          scale=scale)
    return [np.asarray(x) for x in out if x is not None]


def assert_close(name, got, want, tol):
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  assert np.isfinite(got).all(), f"{name}: non-finite values"
  scale = max(1.0, float(np.abs(want).max(initial=0.0)))
  err = float(np.abs(got - want).max(initial=0.0)) / scale
  assert err <= tol, f"{name}: normalised max error {err:.3g} > {tol:.3g}"


def check(kw, case: Case, dtype, seed=0, final=True):
  """Runs `case` with lightning_attention(**kw); returns its outputs.

  final=False: the op without its final state (o and gradients only)."""
  q, k, v, slopes, s0, do, ds = inputs(case, dtype, seed)
  got = [x for x in run(q, k, v, slopes, s0, do, ds, scale=case.scale,
                        chunk_size=case.chunk, final=final, **kw)
         if x is not None]
  want = recurrence64(q, k, v, slopes, s0, do, ds if final else None,
                      scale=case.scale)
  names = NAMES if final else NAMES[:1] + NAMES[2:]
  if not final:
    want = want[:1] + want[2:]
  assert len(got) == len(want)
  assert got[0].dtype == dtype
  if final:
    assert got[1].dtype == jnp.float32
  for name, g, w in zip(names, got, want):
    tol = (SLOPE_TOLERANCES if name == "dslopes" else TOLERANCES)[dtype]
    assert_close(name, g, w, tol)
  return got


class LinearSuite:
  """Subclass with IMPL (and INTERPRET, EXTRA keyword arguments)."""
  IMPL: str = ""
  INTERPRET: bool = False
  EXTRA: dict = {}

  @property
  def kw(self):
    kw = dict(self.EXTRA, impl=self.IMPL)
    if self.INTERPRET:
      kw["interpret"] = True
    return kw

  @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
  def test_matches_recurrence_f32(self, case):
    check(self.kw, case, jnp.float32)

  def test_bfloat16(self):
    check(self.kw, CASES[0], jnp.bfloat16)

  def test_chunk_size_invariance(self):
    """Chunk 32 on the case test_matches_recurrence_f32 runs at chunk 16:
    both meet the float64 recurrence at f32 tolerance (this one without the
    final-state output)."""
    assert CASES[0].chunk == 16
    check(self.kw, dataclasses.replace(CASES[0], chunk=32), jnp.float32,
          final=False)

  def test_decode_continues_prefill(self):
    case = CASES[0]
    q, k, v, slopes, s0, _, _ = inputs(case, jnp.float32)
    t0 = case.seq - 3
    kw = self.kw
    _, state = sj.linear.lightning_attention(
        q[:, :t0], k[:, :t0], v[:, :t0], slopes, scale=case.scale,
        initial_state=s0, return_final_state=True, chunk_size=case.chunk,
        **kw)
    outs = []
    decode_kw = {key: kw[key] for key in ("impl", "interpret") if key in kw}
    for t in range(t0, case.seq):
      o, state = sj.linear.lightning_decode(q[:, t], k[:, t], v[:, t], state,
                                            slopes, scale=case.scale,
                                            **decode_kw)
      outs.append(o)
    want_o, want_state = recurrence64(q, k, v, slopes, s0, scale=case.scale)
    assert_close("decode o", jnp.stack(outs, 1), want_o[:, t0:], 2e-5)
    assert_close("decode state", state, want_state, 2e-5)
