"""`block_attention_probs` on every implementation, plus the CUDA and TPU
lowerings of its kernels run on the CPU."""

import jax
import jax.numpy as jnp
import pytest

import sparsejax as sj
from tests.block_probs_test_base import BlockProbsSuite
from tests.conftest import has_gpu

_TPU = jax.sharding.AbstractDevice(device_kind="TPU v5e", num_cores=1,
                                   platform="tpu")


class TestXla(BlockProbsSuite):
  IMPL = "xla"
  # The backward is shared code: gradients on a GQA and a d48 case.
  GRAD_CASES = ("causal_ragged_gqa", "causal_block32_d48_ragged")


class TestPallasTritonInterpret(BlockProbsSuite):
  IMPL = "pallas_triton"
  INTERPRET = True
  GRAD_CASES = ("causal_ragged_gqa",)


class TestPallasTpuInterpret(BlockProbsSuite):
  IMPL = "pallas_tpu"
  INTERPRET = True
  GRAD_CASES = ("causal_ragged_gqa",)
  # TPU interpret mode simulates the memories and checks races: slow.
  SLOW_CASES = frozenset({"causal_q_longer_than_kv", "bf16", "structure"})


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="compiles the Triton kernel: needs "
                    "a CUDA GPU (CPU coverage: the interpret-mode classes and "
                    "the CUDA lowering tests below)")
class TestPallasTritonGpu(BlockProbsSuite):
  IMPL = "pallas_triton"
  # Every case checks the kernel's values; gradients (the shared backward
  # through the core's kernels, each case its own compiles) on one.
  GRAD_CASES = ("causal_ragged_gqa",)


def _specs(dtype, length, heads, kv_heads, d):
  return (jax.ShapeDtypeStruct((1, length, heads, d), dtype),
          jax.ShapeDtypeStruct((1, length, kv_heads, d), dtype))


@pytest.mark.parametrize("dtype,length,heads,kv_heads,d,block", [
    (jnp.bfloat16, 1000, 4, 2, 128, 64), (jnp.float32, 300, 2, 1, 48, 16),
    (jnp.float16, 4096, 2, 2, 64, 128)])
def test_triton_lowers_for_cuda(dtype, length, heads, kv_heads, d, block):
  f = lambda q, k: sj.learned.block_attention_probs(
      q, k, block_size=block, impl="pallas_triton")
  grad = jax.grad(lambda q, k: f(q, k).sum(), argnums=(0, 1))
  with sj.target_platform("gpu", "NVIDIA H200"):
    for fn, kernels in ((f, 1), (grad, 4)):  # + attention fwd, dQ, dK/dV
      text = jax.jit(fn).trace(*_specs(dtype, length, heads, kv_heads,
                                       d)).lower(
                                           lowering_platforms=("cuda",)
                                       ).as_text()
      assert text.count("xla.gpu.triton") == kernels


@pytest.mark.parametrize("dtype,d", [(jnp.bfloat16, 128), (jnp.float32, 64)])
def test_tpu_lowers(dtype, d):
  """The real Mosaic lowering on CPU: (8, 128) tiling, supported ops."""
  f = lambda q, k: sj.learned.block_attention_probs(
      q, k, block_size=128, impl="pallas_tpu")
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=_TPU)
  with sj.target_platform("tpu"), jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(f).trace(*_specs(dtype, 300, 4, 2, d)).lower(
        lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 1


def test_auto_and_errors():
  q = jnp.ones((1, 32, 2, 16))
  with pytest.raises(ValueError, match="block_size"):
    sj.learned.block_attention_probs(q, q, block_size=24)
  with pytest.raises(ValueError, match="divisible"):
    sj.learned.block_attention_probs(q, jnp.ones((1, 32, 3, 16)))
  with pytest.raises(TypeError, match="int32"):
    sj.learned.block_attention_probs(q.astype(jnp.int32), q)
  with pytest.raises(ValueError, match="impl"):
    sj.learned.block_attention_probs(q, q, impl="nope")
  with pytest.raises(ValueError, match="scale"):
    sj.learned.block_attention_probs(q, q, scale=float("nan"))
  with sj.target_platform("tpu"), pytest.raises(
      ValueError, match="block_size a multiple of 128"):
    sj.learned.block_attention_probs(q, q, block_size=64, impl="pallas_tpu")
  # auto on CPU is the xla path
  f = jax.jit(lambda q, impl: sj.learned.block_attention_probs(
      q, q, block_size=16, impl=impl), static_argnums=1)
  assert jnp.array_equal(f(q, "auto"), f(q, "xla"))
