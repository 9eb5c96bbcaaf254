"""Lowers the lightning Triton kernels for CUDA on the CPU: catches shapes
and ops the GPU would reject (power-of-two sizes, dot shapes) in CI."""

import jax
import jax.numpy as jnp
import pytest

import sparsejax as sj
from pallas_kernels.gpu.lightning_attention import TuningConfig


def _lower(fn, *args):
  with sj.target_platform("gpu", "NVIDIA H200"):
    text = jax.jit(fn).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
  return text.count("xla.gpu.triton")


@pytest.mark.parametrize("dtype,b,t,h,d,e,tuning,kernels", [
    # fla's benchmark shape at 4K: the fused forward (value tiles of 32:
    # 128 programs), a split backward (gradient pass + dq + dk/dv).
    (jnp.bfloat16, 2, 4096, 16, 128, 128, None, (1, 4)),
    # The same with the split forward (state pass + output pass).
    (jnp.bfloat16, 2, 4096, 16, 128, 128, TuningConfig(forward="split"),
     (2, 5)),
    # Large batch * heads: one split, no state/gradient passes.
    (jnp.bfloat16, 4, 4096, 64, 128, 128, None, (1, 3)),
    # Ragged T, padded head dims (96 -> 128, 40 -> 64), f32.
    (jnp.float32, 1, 1000, 2, 96, 40, TuningConfig(num_splits=2), (2, 5)),
    # d_k 256: two value tiles of 64 (f32 partial dq, dk).
    (jnp.float16, 1, 2048, 2, 256, 128, TuningConfig(num_splits=4), (2, 5)),
], ids=["b2h16_d128_fused", "b2h16_d128_split", "one_split",
        "ragged_f32_padded", "dk256_tiles"])
def test_forward_and_backward_lower_for_cuda(dtype, b, t, h, d, e, tuning,
                                             kernels):
  q = jax.ShapeDtypeStruct((b, t, h, d), dtype)
  v = jax.ShapeDtypeStruct((b, t, h, e), dtype)
  s0 = jax.ShapeDtypeStruct((b, h, d, e), jnp.float32)
  slopes = jax.ShapeDtypeStruct((h,), jnp.float32)

  def fwd(q, k, v, slopes, s0):
    return sj.linear.lightning_attention(
        q, k, v, slopes, initial_state=s0, return_final_state=True,
        impl="pallas_triton", tuning=tuning)

  def grads(q, k, v, slopes, s0):
    loss = lambda *a: sum(x.astype(jnp.float32).sum() for x in fwd(*a))
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, slopes, s0)

  assert _lower(fwd, q, q, v, slopes, s0) == kernels[0]
  assert _lower(grads, q, q, v, slopes, s0) == kernels[1]


@pytest.mark.parametrize("d,e", [(128, 128), (64, 100)])
def test_decode_lowers_for_cuda(d, e):
  q = jax.ShapeDtypeStruct((8, 16, d), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((8, 16, e), jnp.bfloat16)
  state = jax.ShapeDtypeStruct((8, 16, d, e), jnp.float32)
  slopes = jax.ShapeDtypeStruct((16,), jnp.float32)
  assert _lower(lambda q, k, v, s, sl: sj.linear.lightning_decode(
      q, k, v, s, sl, impl="pallas_triton"), q, q, v, state, slopes) == 1


def test_tuning_is_validated():
  with pytest.raises(ValueError, match="block_v"):
    TuningConfig(block_v=48)
  with pytest.raises(ValueError, match="num_warps"):
    TuningConfig(num_warps=3)
  with pytest.raises(ValueError, match="num_splits"):
    TuningConfig(num_splits=0)
  with pytest.raises(ValueError, match="forward"):
    TuningConfig(forward="two_pass")
  with pytest.raises(ValueError, match="fill"):
    TuningConfig(fill=0.0)
  q = jnp.zeros((1, 16, 1, 16))
  with pytest.raises(ValueError, match="TuningConfig"):
    sj.linear.lightning_attention(q, q, q, jnp.zeros(1),
                                  impl="pallas_triton", interpret=True,
                                  tuning=object())
