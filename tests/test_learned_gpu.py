"""The learned family on the GPU kernels that impl="auto" picks there (the
Mosaic GPU attention at Hopper shapes, the Triton probs kernel), bf16,
against the dense references. Skipped without a GPU; on CPU the same code
paths run in the other test_learned_* modules (xla and interpret mode)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import sparsejax as sj
from sparsejax.learned import minference
from tests.block_probs_test_base import assert_close
from tests.conftest import has_gpu


def _qkv(l, h=4, hkv=2, d=64, seed=0, dtype=jnp.bfloat16):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (1, l, h, d), dtype),
          jax.random.normal(ks[1], (1, l, hkv, d), dtype),
          jax.random.normal(ks[2], (1, l, hkv, d), dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="runs the GPU kernels: needs a "
                    "CUDA GPU")
class TestLearnedGpu:

  def test_block_attention_probs(self):
    q, k, _ = _qkv(1000, d=128)
    got = jax.jit(lambda q, k: sj.learned.block_attention_probs(
        q, k, block_size=64))(q, k)
    want = sj.learned.block_attention_probs_reference(q, k, block_size=64)
    assert_close("probs", got, want, 3e-2)

  def test_seer_sparse_attention(self):
    q, k, v = _qkv(2048)
    gate = sj.learned.AttnGate(4, 2, 64, block_size=64, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(gate)

    @jax.jit
    def run(q, k, v):
      blocks = sj.learned.select_blocks(nnx.merge(graphdef, state)(q, k),
                                        density=0.2)
      mask = sj.learned.gate_block_mask(blocks, block_size=64, q_len=2048)
      return sj.attention(q, k, v, mask), mask.to_dense()

    out, dense = run(q, k, v)
    want = sj.learned.masked_attention_reference(q, k, v, dense)
    assert_close("out", out, want, 2e-2)

  def test_routing_attention(self):
    q, k, v = _qkv(2048)
    idx = sj.learned.cluster_members(
        sj.learned.routing_norm(q), jax.random.normal(
            jax.random.key(1), (4, 8, 64)), 256)
    got = jax.jit(sj.learned.routing_attention)(q, k, v, idx)
    want = sj.learned.routing_attention(q, k, v, idx, impl="reference")
    assert_close("out", got, want, 2e-2)

  def test_minference_vertical_slash(self):
    q, k, v = _qkv(4096)
    pattern = minference.VerticalSlash(256, 512)

    @jax.jit
    def run(q, k, v):
      mask = sj.learned.minference_mask(q, k, pattern, block_size=64)
      return sj.attention(q, k, v, mask), mask.to_dense()

    out, dense = run(q, k, v)
    want = sj.learned.masked_attention_reference(q, k, v, dense)
    assert_close("out", out, want, 2e-2)
