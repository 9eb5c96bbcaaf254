"""Lowers the Triton kernels for CUDA on the CPU: catches shapes and ops the
GPU would reject (power-of-two sizes, dot shapes, scalar prefetch) in CI."""


import jax
import jax.numpy as jnp
import pytest

import sparsejax as sj


def _lower(fn, *args):
  with sj.target_platform("gpu", "NVIDIA H200"):
    text = jax.jit(fn).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
  assert "__gpu$xla.gpu.triton" in text
  return text


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("head_dim,heads,kv_heads,block,soft_cap", [
    (64, 4, 4, 64, None), (96, 4, 2, 128, 30.0), (128, 8, 1, 128, None),
    (256, 2, 2, 32, None), (32, 2, 1, 16, None)])
def test_forward_and_backward_lower_for_cuda(dtype, head_dim, heads, kv_heads,
                                             block, soft_cap):
  length = 4 * block + 3  # ragged: partial tail block
  mask = sj.masks.s2(length, heads, block_size=block, local_blocks=2,
                     vert_stride=2, num_kv_heads=kv_heads)
  q = jax.ShapeDtypeStruct((2, length, heads, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((2, length, kv_heads, head_dim), dtype)

  def fwd(q, k, v, m):
    return sj.attention(q, k, v, m, impl="pallas_triton", soft_cap=soft_cap,
                        return_lse=True)

  def grads(q, k, v, m):
    f = lambda q, k, v: fwd(q, k, v, m)[0].astype(jnp.float32).sum()
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  assert _lower(fwd, q, kv, kv, mask).count("xla.gpu.triton") == 1
  assert _lower(grads, q, kv, kv, mask).count("xla.gpu.triton") == 3


def test_lowering_rejects_what_the_gpu_rejects():
  """The cross-lowering is real: a non-power-of-two block fails it."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as pltriton

  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2

  f = lambda x: pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((24,), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=4))(x)
  with pytest.raises(ValueError, match="power of 2"):
    jax.jit(f).trace(jax.ShapeDtypeStruct((24,), jnp.float32)).lower(
        lowering_platforms=("cuda",))


def test_head_dim_256_needs_small_tiles():
  """128-wide tiles at head_dim 256 overflow the H200's shared memory."""
  q = jax.ShapeDtypeStruct((1, 300, 2, 256), jnp.bfloat16)
  fwd = lambda m: (lambda q, k, v: sj.attention(q, k, v, m,
                                                impl="pallas_triton"))
  with pytest.raises(ValueError, match="block_q <= 64"):
    _lower(fwd(sj.masks.causal(300, block_size=128)), q, q, q)
  _lower(fwd(sj.masks.causal(300, block_size=64)), q, q, q)


@pytest.mark.parametrize("mod", ["alibi", "relative_bias", None])
def test_score_mods_and_segments_lower_for_cuda(mod):
  """Score mods (a table gather from a ref, the in-kernel statistics loop)
  and segment ids (the seg list, id slices) lower with forward and grads."""
  length, heads = 4 * 64 + 5, 4
  mask = sj.masks.s2(length, heads, block_size=64, local_blocks=2,
                     vert_stride=2, num_kv_heads=2)
  make = {"alibi": (sj.score_mods.Alibi, (heads,)),
          "relative_bias": (sj.score_mods.RelativeBias, (heads, 255)),
          None: (None, (heads,))}[mod]
  q = jax.ShapeDtypeStruct((2, length, heads, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, length, 2, 64), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((2, length), jnp.int32)
  param = jax.ShapeDtypeStruct(make[1], jnp.float32)

  def loss(q, k, v, p, ids):
    out = sj.attention(q, k, v, mask, impl="pallas_triton", soft_cap=30.0,
                       score_mod=make[0](p) if make[0] else None,
                       q_segment_ids=ids)
    return out.astype(jnp.float32).sum()

  grads = jax.grad(loss, argnums=(0, 1, 2, 3))
  assert _lower(grads, q, kv, kv, param, ids).count("xla.gpu.triton") == 3


@pytest.mark.parametrize("mod,stages", [("relative_bias", 2), ("alibi", 3),
                                        (None, 3)])
def test_gathering_mods_get_a_forward_stage_less(mod, stages):
  """A table gather's layout conversion takes the shared memory of one
  pipeline stage at head_dim 128 (256 KB asked on the H200 with 3)."""
  heads = 4
  mask = sj.masks.causal(512, block_size=128)
  make = {"alibi": (sj.score_mods.Alibi, (heads,)),
          "relative_bias": (sj.score_mods.RelativeBias, (heads, 255)),
          None: (None, (heads,))}[mod]
  q = jax.ShapeDtypeStruct((1, 512, heads, 128), jnp.bfloat16)
  param = jax.ShapeDtypeStruct(make[1], jnp.float32)
  fwd = lambda q, p: sj.attention(q, q, q, mask, impl="pallas_triton",
                                  score_mod=make[0](p) if make[0] else None)
  text = _lower(fwd, q, param)
  assert f'name = "sparsejax_block_sparse_fwd", num_stages = {stages}' in text
