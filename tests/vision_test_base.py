"""One suite per vision op, run against every implementation
(test_vision_impls.py subclasses it with IMPL / INTERPRET).

Every case checks the output and ALL gradients (q, k, v and the bias table)
against the dense float64 definition in `sparsejax.vision.reference`, on
random inputs with odd, non-square maps.
"""

import dataclasses
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj

V = sj.vision
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def enable_x64():
  """A float64 context (jax.enable_x64; jax.experimental's before it)."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64 as ctx  # pylint: disable=g-import-not-at-top
  return ctx()


def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def assert_close(name, got, want, tol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  assert np.isfinite(got).all(), name
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(got - want).max()) / scale
  assert err <= tol, f"{name}: normalised max error {err:.3g} > {tol:.3g}"


def check_against_f64(fn, args, n_diff, kw, dtype, seed=0):
  """fn(*args, **kw) and its vjp vs the same with impl='reference' in f64.

  The first n_diff args are differentiated (a random cotangent)."""
  out_shape = jax.eval_shape(lambda *a: fn(*a, impl="reference"), *args)
  do = _normal(jax.random.key(seed + 99), out_shape.shape, dtype)
  cast = lambda x, t: x.astype(t) if hasattr(x, "dtype") and jnp.issubdtype(
      x.dtype, jnp.floating) else x

  def run(args, do, **kw2):
    @jax.jit
    def go(args, do):
      f = lambda *d: fn(*d, *args[n_diff:], **kw2)
      out, vjp = jax.vjp(f, *args[:n_diff])
      return (out,) + vjp(do)
    return go(args, do)

  got = run([cast(a, dtype) if i < 3 else a for i, a in enumerate(args)],
            do, **kw)
  with enable_x64():
    want = run([cast(a, jnp.float64) for a in args], do.astype(jnp.float64),
               impl="reference")
    want = jax.device_get(want)
  names = ("out", "dq", "dk", "dv", "dbias")
  for name, g, w in zip(names, got, want):
    assert_close(name, g, w, TOL[dtype])
  return got


@dataclasses.dataclass(frozen=True)
class WinCase:
  name: str
  op: str  # block | grid | window
  shape: Tuple[int, ...]  # q shape
  window: Any
  bias_heads: Optional[int]  # None: no bias


WINDOW_CASES = [
    WinCase("block_nonsquare_bias", "block", (2, 6, 4, 2, 16), (3, 2), 2),
    WinCase("grid_odd_bias_shared", "grid", (1, 6, 10, 3, 16), (3, 5), 1),
    WinCase("block_p5_two_tiles", "block", (1, 10, 5, 1, 16), 5, 1),
    WinCase("window_prepartitioned", "window", (2, 3, 9, 2, 32), 3, None),
]
_OPS = {"block": V.block_attention, "grid": V.grid_attention,
        "window": V.window_attention}


def window_args(case, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (_normal(x, case.shape, jnp.float32) for x in ks[:3])
  if case.bias_heads is None:
    return (q, k, v), 3
  p1, p2 = sj.vision.permute.as_pair(case.window, "window")
  table = 0.5 * _normal(ks[3], (case.bias_heads, 2 * p1 - 1, 2 * p2 - 1),
                        jnp.float32)
  return (q, k, v, table), 4


class WindowSuite:
  """MaxViT block / grid / pre-partitioned window attention."""
  IMPL: str = ""
  INTERPRET: bool = False
  CASES = WINDOW_CASES
  EXTRAS = True  # bf16 (slow in TPU interpret mode)
  # Bias-gradient determinism: only where a race could show (compiled GPU
  # kernels); interpret mode and XLA on CPU run programs in a fixed order.
  DETERMINISM = False

  def kw(self):
    return dict(impl=self.IMPL, **({"interpret": True} if self.INTERPRET
                                   else {}))

  def _fn(self, case):
    op = _OPS[case.op]
    if case.bias_heads is None:
      return lambda q, k, v, **kw: op(q, k, v, case.window, **kw)
    return lambda q, k, v, t, **kw: op(q, k, v, case.window, rel_bias=t,
                                       **kw)

  def test_matches_f64_reference(self, case):
    args, n = window_args(case)
    check_against_f64(self._fn(case), args, n, self.kw(), jnp.float32)

  def test_bf16(self):
    if not self.EXTRAS:
      pytest.skip("covered by the other implementations' classes (CPU time)")
    case = self.CASES[0]
    args, n = window_args(case, seed=1)
    check_against_f64(self._fn(case), args, n, self.kw(), jnp.bfloat16)

  def test_deterministic(self):
    if not self.DETERMINISM:
      pytest.skip("cannot fail here (programs run in a fixed order on CPU); "
                  "the GPU classes check it")
    case = self.CASES[0]
    args, _ = window_args(case, seed=2)
    f = lambda t: (self._fn(case)(*args[:3], t, **self.kw()) ** 2).sum()
    a, b = jax.grad(f)(args[3]), jax.grad(f)(args[3])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@dataclasses.dataclass(frozen=True)
class NACase:
  name: str
  shape: Tuple[int, ...]
  kernel: Any
  dilation: Any = 1
  causal: Any = False
  tile: Any = None
  bias: bool = False


NA_CASES = [
    NACase("1d_even_kernel_dilation", (2, 37, 2, 16), 4, 3, tile=16),
    NACase("1d_causal_dilation", (1, 45, 2, 16), 5, 2, True, tile=16),
    NACase("2d_nonsquare_dilation", (1, 9, 13, 2, 16), (3, 4), (2, 3),
           tile=(4, 4)),
    NACase("2d_kernel_equals_map", (1, 5, 6, 1, 16), (5, 6), tile=(4, 4)),
    NACase("1d_causal_bias", (1, 23, 2, 16), 5, 2, True, tile=16, bias=True),
    NACase("2d_bias_even_dilation", (1, 7, 8, 2, 16), (4, 3), (1, 2),
           tile=(4, 4), bias=True),
]


def na_args(case, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (_normal(x, case.shape, jnp.float32) for x in ks[:3])
  if not case.bias:
    return (q, k, v), 3
  n = len(case.shape) - 3
  kernel = (case.kernel,) * n if isinstance(case.kernel, int) else case.kernel
  table = _normal(ks[3], (case.shape[-2],) + tuple(2 * x - 1 for x in kernel),
                  jnp.float32)
  return (q, k, v, table), 4


def na_fn(case):
  kw = dict(dilation=case.dilation, causal=case.causal, tile_shape=case.tile)
  if not case.bias:
    return lambda q, k, v, **o: V.neighborhood_attention(
        q, k, v, case.kernel, **kw, **o)
  return lambda q, k, v, t, **o: V.neighborhood_attention(
      q, k, v, case.kernel, rel_bias=t, **kw, **o)


class NeighborhoodSuite:
  IMPL: str = ""
  INTERPRET: bool = False
  BIAS_UNSUPPORTED: Optional[str] = None  # the reason's regex, if any
  CASES = NA_CASES

  def kw(self):
    return dict(impl=self.IMPL, **({"interpret": True} if self.INTERPRET
                                   else {}))

  def test_matches_f64_reference(self, case):
    if case.bias and self.BIAS_UNSUPPORTED:
      with pytest.raises(ValueError, match=self.BIAS_UNSUPPORTED):
        args, _ = na_args(case)
        na_fn(case)(*args, **self.kw())
      return
    args, n = na_args(case)
    check_against_f64(na_fn(case), args, n, self.kw(), jnp.float32)


@dataclasses.dataclass(frozen=True)
class RouteCase:
  name: str
  shape: Tuple[int, ...]
  num_regions: int
  topk: int


ROUTING_CASES = [
    RouteCase("top1_regions16", (2, 8, 16, 2, 16), 2, 1),
    RouteCase("top3_regions_of_4_padded", (1, 6, 6, 2, 16), 3, 3),
    RouteCase("topk_all_regions", (1, 8, 8, 1, 16), 2, 4),
    RouteCase("top1_small", (1, 8, 8, 1, 16), 2, 1),
]


class RoutingSuite:
  IMPL: str = ""
  INTERPRET: bool = False
  CASES = ROUTING_CASES

  def kw(self):
    return dict(impl=self.IMPL, **({"interpret": True} if self.INTERPRET
                                   else {}))

  def test_matches_f64_reference(self, case):
    ks = jax.random.split(jax.random.key(3), 3)
    args = tuple(_normal(x, case.shape, jnp.float32) for x in ks)
    fn = lambda q, k, v, **kw: V.routing_attention(q, k, v, case.num_regions,
                                                   case.topk, **kw)
    check_against_f64(fn, args, 3, self.kw(), jnp.float32)

  DENSE_CHECK = True

  def test_topk_all_is_dense(self):
    if not self.DENSE_CHECK:
      pytest.skip("covered by the other implementations' classes (CPU time)")
    case = ROUTING_CASES[2]
    ks = jax.random.split(jax.random.key(4), 3)
    q, k, v = (_normal(x, case.shape, jnp.float32) for x in ks)
    got = V.routing_attention(q, k, v, case.num_regions,
                              case.num_regions ** 2, **self.kw())
    flat = lambda x: x.reshape(x.shape[0], -1, *x.shape[3:])
    want = sj.attention(flat(q), flat(k), flat(v), impl="reference")
    assert_close("out", got, want.reshape(q.shape), TOL[jnp.float32])
