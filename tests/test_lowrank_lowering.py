"""Scatterbrain kernels through the real GPU/TPU lowerings on the CPU: the
Triton kernels lowered for CUDA (power-of-two shapes, dot sizes, no scalar
prefetch) and the TPU kernels through Mosaic ((8, 128) tiling), which
interpret mode does not check."""

import jax
import jax.numpy as jnp
import pytest

import sparsejax as sj
from sparsejax import lowrank

_TPU = jax.sharding.AbstractDevice(device_kind="TPU v5e", num_cores=1,
                                   platform="tpu")


def _specs(length, heads, kv_heads, d, m, dtype):
  q = jax.ShapeDtypeStruct((1, length, heads, d), dtype)
  kv = jax.ShapeDtypeStruct((1, length, kv_heads, d), dtype)
  return q, kv, jax.ShapeDtypeStruct((m, d), jnp.float32)


def _grads(mask, causal, impl):
  def loss(q, k, v, w):
    out = lowrank.scatterbrain_attention(q, k, v, mask, w, causal=causal,
                                         impl=impl)
    return out.astype(jnp.float32).sum()
  return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("dtype,d,heads,kv_heads,m,block,causal", [
    (jnp.bfloat16, 64, 4, 2, 32, 128, False),
    (jnp.bfloat16, 128, 2, 1, 24, 64, True),   # m padded to 32
    (jnp.float16, 96, 2, 2, 16, 64, True),     # head_dim padded to 128
    (jnp.float32, 32, 2, 1, 16, 16, False),
])
def test_triton_lowers_for_cuda(dtype, d, heads, kv_heads, m, block, causal):
  length = 4 * block + 3  # ragged tail block
  mask = sj.masks.sliding_window(length, block + 5, causal=causal,
                                 block_size=block)
  q, kv, w = _specs(length, heads, kv_heads, d, m, dtype)
  fwd = lambda q, k, v, w: lowrank.scatterbrain_attention(
      q, k, v, mask, w, causal=causal, impl="pallas_triton")
  with sj.target_platform("gpu", "NVIDIA H200"):
    text = jax.jit(fwd).trace(q, kv, kv, w).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1
    text = jax.jit(_grads(mask, causal, "pallas_triton")).trace(
        q, kv, kv, w).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3  # forward, dQ, dK/dV


def test_triton_head_dim_256_needs_small_blocks():
  q, kv, w = _specs(300, 2, 2, 256, 32, jnp.bfloat16)
  with sj.target_platform("gpu", "NVIDIA H200"):
    with pytest.raises(ValueError, match="blocks <= 64"):
      lowrank.scatterbrain_attention(
          jnp.zeros(q.shape, q.dtype), jnp.zeros(kv.shape, kv.dtype),
          jnp.zeros(kv.shape, kv.dtype), sj.masks.causal(300, block_size=128),
          jnp.zeros(w.shape), causal=True, impl="pallas_triton")


@pytest.mark.parametrize("dtype,causal", [(jnp.bfloat16, False),
                                          (jnp.float32, True)])
def test_tpu_lowers_for_tpu(dtype, causal):
  """Forward and gradient through the Mosaic lowering (head_dim 64 and 48
  features padded to 128 lanes)."""
  mask = sj.masks.sliding_window(384, 130, causal=causal, block_size=128)
  q, kv, w = _specs(384, 4, 2, 64, 48, dtype)
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=_TPU)
  with sj.target_platform("tpu", "TPU v5e"), \
      jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(_grads(mask, causal, "pallas_tpu")).trace(
        q, kv, kv, w).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 3  # forward, dQ, dK/dV
