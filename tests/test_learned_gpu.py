"""The learned family on the GPU kernels that impl="auto" picks there (the
Mosaic GPU attention at Hopper shapes, the Triton probs kernel), bf16,
against the dense references. Skipped without a GPU; on CPU the same code
paths run in the other test_learned_* modules (xla and interpret mode).

Compiles are what cost here, so the tests share programs: one jitted
attention and one jitted reference serve Seer and MInference (same shapes,
lists padded to one width), and every reference is jitted (eager dispatch
compiles each op on its own).
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import sparsejax as sj
from sparsejax.learned import minference
from tests.block_probs_test_base import assert_close, normal
from tests.conftest import has_gpu

L, BLOCK = 2048, 64
WIDTH = L // BLOCK - 1  # Seer's list width (its dense last rows): shared


def _qkv(l=L, h=4, hkv=2, d=64, seed=0, dtype=jnp.bfloat16):
  return (normal(3 * seed, (1, l, h, d), dtype),
          normal(3 * seed + 1, (1, l, hkv, d), dtype),
          normal(3 * seed + 2, (1, l, hkv, d), dtype))


@functools.lru_cache(maxsize=None)
def _programs():
  """(attention(q, k, v, mask), reference(q, k, v, dense bool)) jitted."""
  return (jax.jit(lambda q, k, v, mask: sj.attention(q, k, v, mask)),
          jax.jit(sj.learned.masked_attention_reference))


def _check_mask(mask_fn, seed):
  q, k, v = _qkv(seed=seed)
  mask, dense = jax.jit(lambda q, k: (lambda m: (m, m.to_dense()))(
      mask_fn(q, k)))(q, k)
  attention, reference = _programs()
  assert_close("out", attention(q, k, v, mask), reference(q, k, v, dense),
               2e-2)
  return mask


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="runs the GPU kernels: needs a "
                    "CUDA GPU")
class TestLearnedGpu:

  def test_block_attention_probs(self):
    q, k, _ = _qkv(1000, d=128)
    got = jax.jit(lambda q, k: sj.learned.block_attention_probs(
        q, k, block_size=BLOCK))(q, k)
    want = jax.jit(lambda q, k: sj.learned.block_attention_probs_reference(
        q, k, block_size=BLOCK))(q, k)
    assert_close("probs", got, want, 3e-2)

  def test_seer_and_minference_share_one_attention_program(self):
    gate = sj.learned.AttnGate(4, 2, 64, block_size=BLOCK, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(gate)

    def seer(q, k):
      return sj.learned.gate_mask(nnx.merge(graphdef, state)(q, k),
                                  block_size=BLOCK, q_len=L, density=0.2,
                                  width=WIDTH)

    def vertical_slash(q, k):
      return sj.learned.minference_mask(
          q, k, minference.VerticalSlash(256, 512), block_size=BLOCK,
          width=WIDTH)

    masks = [_check_mask(seer, 0), _check_mask(vertical_slash, 1)]
    shapes = [jax.tree.map(jnp.shape, m) for m in masks]
    assert shapes[0] == shapes[1]
    assert _programs()[0]._cache_size() == 1  # pylint: disable=protected-access

  def test_routing_attention(self):
    q, k, v = _qkv()
    idx = sj.learned.cluster_members(
        sj.learned.routing_norm(q), normal(7, (4, 8, 64)), 256)
    got = jax.jit(sj.learned.routing_attention)(q, k, v, idx)
    want = jax.jit(functools.partial(sj.learned.routing_attention,
                                     impl="reference"))(q, k, v, idx)
    assert_close("out", got, want, 2e-2)
