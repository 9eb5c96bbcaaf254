"""impl="pallas_tpu" on CPU: the shared lightning suite in TPU interpret
mode, the real Mosaic lowering for TPU, and a two-core race check."""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

import sparsejax as sj
from pallas_kernels.tpu import lightning_attention as tpu_la
from tests import linear_test_base as base

_TPU = jax.sharding.AbstractDevice(device_kind="TPU v5e", num_cores=1,
                                   platform="tpu")


class TestPallasTpuInterpret(base.LinearSuite):
  IMPL = "pallas_tpu"
  INTERPRET = True


def _lower_tpu(fn, *args):
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=_TPU)
  with sj.target_platform("tpu", "TPU v5e"), \
      jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(fn).trace(*args).lower(
        lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("dtype,d,e", [(jnp.bfloat16, 128, 128),
                                       (jnp.float32, 64, 200)],
                         ids=["bf16_d128", "f32_d64_e200_padded"])
def test_lowers_for_tpu(dtype, d, e):
  """Forward (with final state) and all gradients through the Mosaic
  lowering: (8, 128) tiling and supported primitives, which interpret mode
  does not check."""
  q = jax.ShapeDtypeStruct((1, 300, 2, d), dtype)
  v = jax.ShapeDtypeStruct((1, 300, 2, e), dtype)
  s0 = jax.ShapeDtypeStruct((1, 2, d, e), jnp.float32)
  slopes = jax.ShapeDtypeStruct((2,), jnp.float32)

  def loss(q, k, v, slopes, s0):
    o, final = sj.linear.lightning_attention(
        q, k, v, slopes, initial_state=s0, return_final_state=True,
        impl="pallas_tpu")
    return o.astype(jnp.float32).sum() + final.sum()

  text = _lower_tpu(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), q, q, v, slopes,
                    s0)
  assert text.count("tpu_custom_call") == 3  # forward, dq, dk/dv
  dq = jax.ShapeDtypeStruct((4, 2, d), dtype)
  dv = jax.ShapeDtypeStruct((4, 2, e), dtype)
  st = jax.ShapeDtypeStruct((4, 2, d, e), jnp.float32)
  text = _lower_tpu(lambda q, k, v, s, sl: sj.linear.lightning_decode(
      q, k, v, s, sl, impl="pallas_tpu"), dq, dq, dv, st, slopes)
  assert text.count("tpu_custom_call") == 1


def test_hardware_chunk_must_fill_lanes():
  q = jnp.zeros((1, 64, 1, 128))
  with sj.target_platform("tpu", "TPU v5e"):
    with pytest.raises(ValueError, match="multiple of 128"):
      jax.eval_shape(lambda q: sj.linear.lightning_attention(
          q, q, q, jnp.zeros(1), impl="pallas_tpu", chunk_size=64), q)
  with pytest.raises(ValueError, match="multiple of 128"):
    tpu_la.lightning_attention(q, q, q, jnp.zeros(1), None, scale=1.0,
                               chunk_size=64)


def test_tuning_is_validated():
  with pytest.raises(ValueError, match="vmem_limit_bytes"):
    tpu_la.TuningConfig(vmem_limit_bytes=10)
  with pytest.raises(ValueError, match="megacore"):
    tpu_la.TuningConfig(megacore=1)


def test_race_free_on_two_cores():
  """(batch, head) axes split over two simulated TensorCores."""
  try:
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip("TPU interpret race state moved in this jax version")
  case = base.Case("race", 1, 32, 2, 16, 16, (0.3, 0.0))  # 2 programs
  q, k, v, slopes, s0, _, _ = base.inputs(case, jnp.float32)
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  o, final = sj.linear.lightning_attention(
      q, k, v, slopes, initial_state=s0, return_final_state=True,
      impl="pallas_tpu", interpret=params, chunk_size=16)
  jax.block_until_ready(o)
  races = getattr(interpret_pallas_call, "races", None)
  if races is None:
    pytest.skip("no race state in this jax version")
  assert not races.races_found
  want_o, want_final = base.recurrence64(q, k, v, slopes, s0, scale=1.0)
  base.assert_close("o", o, want_o, 2e-5)
  base.assert_close("final", final, want_final, 2e-5)
  assert np.isfinite(np.asarray(final)).all()
