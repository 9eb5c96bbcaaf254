"""The shared lightning-attention suite against each implementation, plus
checks specific to the references, the xla path and the Triton kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from pallas_kernels.gpu.lightning_attention import TuningConfig
from tests import linear_test_base as base
from tests.conftest import has_gpu


class TestXla(base.LinearSuite):
  IMPL = "xla"


class TestPallasTritonInterpret(base.LinearSuite):
  """The split forward with three splits (state pass, XLA scan of split
  states, output pass) and the split backward."""
  IMPL = "pallas_triton"
  INTERPRET = True
  EXTRA = {"tuning": TuningConfig(forward="split", num_splits=3)}


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="compiles the Triton kernels: needs "
                    "a CUDA GPU (CPU coverage: the interpret-mode class above "
                    "and test_linear_lowering.py)")
class TestPallasTritonGpu(base.LinearSuite):
  IMPL = "pallas_triton"

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  @pytest.mark.parametrize("shape", [(2, 4100, 4, 128, 128),
                                     (1, 1000, 2, 64, 128),
                                     (1, 3000, 2, 256, 64)],
                           ids=["d128_ragged", "dk64_dv128", "dk256"])
  def test_kernel_shapes(self, shape, dtype):
    b, t, h, d, e = shape
    case = base.Case("gpu", b, t, h, d, e, (0.0, 0.05, 1.0, 3.0)[:h],
                     chunk=None)
    base.check(self.kw, case, dtype)

  @pytest.mark.parametrize("shape", [(2, 4100, 4, 128, 128),
                                     (1, 3000, 2, 256, 64)],
                           ids=["d128_ragged", "dk256"])
  def test_fused_forward(self, shape):
    """The fused forward (what batch * heads >= 32 gets by default) on
    shapes small enough for the float64 reference, bf16."""
    b, t, h, d, e = shape
    case = base.Case("gpu", b, t, h, d, e, (0.0, 0.05, 1.0, 3.0)[:h],
                     chunk=None)
    base.check(dict(self.kw, tuning=TuningConfig(forward="fused")), case,
               jnp.bfloat16)


@pytest.mark.parametrize("tuning", [
    # The fused forward over value tiles (d_v 24 -> 32: two tiles of 16),
    # storing the states entering the backward's 3 splits.
    TuningConfig(forward="fused", forward_block_v=16, num_splits=3),
    # block_v < d_v in the backward: dq, dk are f32 partials over value
    # tiles, summed (one split: no gradient pass).
    TuningConfig(forward="split", num_splits=1, block_v=16),
], ids=["fused_value_tiles_3_splits", "split_value_tiles_1_split"])
def test_triton_value_tiles_and_splits(tuning):
  base.check({"impl": "pallas_triton", "interpret": True, "tuning": tuning},
             base.CASES[0], jnp.float32)


@pytest.mark.parametrize("pairs,forward,tile,params", [
    # fla's B2 H16 / B1 H32: 128 programs of 32 columns, one wave.
    (32, "fused", 32, (4, 3)),
    (64, "fused", 64, (4, 3)),
    # Several waves: 2 stages, so that two 4-warp programs share an SM.
    (256, "fused", 64, (4, 2)),
    # Too few pairs even at 32 columns: the split forward, 128 columns.
    (8, "split", 128, (8, 3)),
])
def test_triton_forward_design_choice(pairs, forward, tile, params):
  t = TuningConfig().resolved(128, 128, jnp.bfloat16, pairs, 256, 64)
  assert (t.forward, t.forward_block_v, t.forward_params) == (
      forward, tile, params)
  assert t.num_splits >= 1 and t.block_v == 128


def test_quadratic_equals_recurrence_float64():
  case = base.CASES[0]
  q, k, v, slopes, s0, _, _ = base.inputs(case, jnp.float32)
  with base.x64():
    args = [jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, slopes,
                                                              s0)]
    o1, f1 = sj.linear.lightning_recurrence(*args[:4], scale=0.5,
                                            initial_state=args[4])
    o2, f2 = sj.linear.lightning_quadratic(*args[:4], scale=0.5,
                                           initial_state=args[4])
    assert o1.dtype == jnp.float64
    np.testing.assert_allclose(o1, o2, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(f1, f2, rtol=1e-10, atol=1e-10)
    # Gradients of the quadratic form are finite at strong decay (the
    # exponent is masked before exp).
    g = jax.grad(lambda s: sj.linear.lightning_quadratic(
        *args[:3], s, scale=0.5)[0].sum())(args[3])
    assert np.isfinite(np.asarray(g)).all()


def test_xla_length_128k_strong_decay_is_finite_and_exact():
  """128K tokens, slope 3 and slope 0 heads: no inf/NaN (decays are exp of
  non-positive sums), outputs equal the recurrence; gradients finite."""
  t = 1 << 17
  ks = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(ks[0], (1, t, 2, 8)) * 8 ** -0.5
  k = jax.random.normal(ks[1], (1, t, 2, 8)) * 8 ** -0.5
  v = jax.random.normal(ks[2], (1, t, 2, 8))
  slopes = jnp.array([3.0, 0.0])

  @jax.jit
  def go(q, k, v):
    f = lambda q, k, v: sj.linear.lightning_attention(
        q, k, v, slopes, impl="xla", return_final_state=True)
    (o, final), vjp = jax.vjp(f, q, k, v)
    return o, final, vjp((jnp.ones_like(o), jnp.ones_like(final)))

  o, final, grads = go(q, k, v)
  for x in (o, final) + tuple(grads):
    assert np.isfinite(np.asarray(x)).all()
  want_o, want_final = jax.jit(lambda q, k, v: sj.linear.lightning_recurrence(
      q, k, v, slopes))(q, k, v)
  base.assert_close("o", o, want_o, 1e-4)
  base.assert_close("final", final, want_final, 1e-4)
  # Slope 3 forgets within a few tokens; slope 0 accumulates ~sqrt(T).
  assert float(jnp.abs(final[0, 0]).max()) < 20.0
  assert float(jnp.abs(final[0, 1]).max()) > 50.0


def test_slope_zero_is_causal_linear_attention():
  q, k, v, _, _, _, _ = base.inputs(base.CASES[1], jnp.float32)
  got = sj.linear.lightning_attention(q, k, v, jnp.zeros(2), impl="xla")
  mask = np.tril(np.ones((11, 11)))
  a = np.einsum("bihd,bjhd->bhij", q, k) * mask
  want = np.einsum("bhij,bjhe->bihe", a, v)
  base.assert_close("o", got, want, 2e-5)
