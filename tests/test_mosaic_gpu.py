"""The Mosaic GPU (Hopper) kernel: CUDA lowering on the CPU, numerics on GPU.

The shared suite's cases use f32 and 16/32 blocks, which the wgmma kernel
does not take (it needs bf16/fp16, head_dim 64/128/256 and 64-multiple
blocks), so this module carries the same kinds of cases at those shapes:
ragged lengths, GQA/MQA, soft-cap, fully masked rows, empty block rows,
random element masks and random block patterns, each dtype.
"""

import dataclasses
import logging

import hypothesis
from hypothesis import strategies as st
import jax
from jax.sharding import AbstractDevice, AbstractMesh
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax.block_sparse.implementations import REGISTRY
from tests.attention_cases import Case, RowsOff, empty_row_blocks
from tests.attention_test_base import check_case, draw_random_block_case
from tests.conftest import has_gpu

H200 = ("gpu", "NVIDIA H200")


CASES = [
    Case("dense_none_d64", 1, 256, 256, 2, 2, 64, lambda: None),
    Case("causal_ragged_gqa_d128", 2, 300, 300, 4, 2, 128,
         lambda: sj.masks.causal(300, block_size=128)),
    Case("sliding_mqa_softcap_d64", 1, 512, 512, 4, 1, 64,
         lambda: sj.masks.sliding_window(512, 100, block_size=64), 5.0),
    Case("s2_gqa_d128", 1, 1024, 1024, 4, 2, 128,
         lambda: sj.masks.s2(1024, 4, block_size=128, local_blocks=2,
                             vert_stride=3, num_kv_heads=2)),
    Case("s2_block64_ragged_d256", 1, 600, 600, 2, 2, 256,
         lambda: sj.masks.s2(600, 2, block_size=64, local_blocks=2,
                             vert_stride=2)),
    Case("causal_block128_d256", 1, 256, 256, 2, 1, 256,
         lambda: sj.masks.causal(256, block_size=128)),
    Case("cross_random_per_batch_head", 2, 128, 320, 2, 2, 64,
         lambda: sj.masks.from_mask_fn(sj.mask_fns.HashedRandom(3, 2, 3),
                                       q_len=128, kv_len=320, batch=2,
                                       num_heads=2, block_size=64)),
    Case("fully_masked_rows", 1, 250, 250, 2, 1, 128,
         lambda: sj.masks.from_mask_fn(RowsOff(), q_len=250, block_size=128)),
    Case("empty_block_row", 1, 250, 250, 2, 2, 64,
         lambda: empty_row_blocks(block=64, length=250)),
    Case("and_or_combination", 1, 512, 512, 2, 2, 128,
         lambda: (sj.masks.sliding_window(512, 150, block_size=128)
                  | sj.masks.s2(512, 2, block_size=128, local_blocks=1,
                                vert_stride=2))
         & sj.masks.causal(512, block_size=128)),
]
BY_NAME = {c.name: c for c in CASES}
DTYPES = [pytest.param(jnp.bfloat16, id="bf16"),
          pytest.param(jnp.float16, id="fp16")]


def _specs(case, dtype):
  q = jax.ShapeDtypeStruct((case.batch, case.q_len, case.heads,
                            case.head_dim), dtype)
  kv = jax.ShapeDtypeStruct((case.batch, case.kv_len, case.kv_heads,
                             case.head_dim), dtype)
  return q, kv


def _lower(fn, *args):
  dev = AbstractDevice(device_kind=H200[1], platform="gpu", num_cores=132)
  with sj.target_platform(*H200), \
      jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)):
    return jax.jit(fn).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()


# --- CPU: the real Mosaic GPU lowering, run for CUDA -------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_and_backward_lower_for_cuda(case, dtype):
  mask = case.make_mask()
  q, kv = _specs(case, dtype)

  def fwd(q, k, v):
    return sj.attention(q, k, v, mask, impl="pallas_mosaic_gpu",
                        soft_cap=case.soft_cap, return_lse=True)

  def grads(q, k, v):
    f = lambda q, k, v: fwd(q, k, v)[0].astype(jnp.float32).sum()
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  assert _lower(fwd, q, kv, kv).count("custom_call @mosaic_gpu") == 1
  # forward (residuals), dQ, dK/dV
  assert _lower(grads, q, kv, kv).count("custom_call @mosaic_gpu") == 3


def test_lowering_is_real():
  """An op the Mosaic GPU lowering lacks fails the CPU cross-lowering."""
  @dataclasses.dataclass(frozen=True)
  class PopCount:  # population_count has no Mosaic GPU lowering rule
    def __call__(self, b, h, q, kv):
      return jax.lax.population_count(q) >= jax.lax.population_count(kv)

  mask = sj.masks.from_mask_fn(PopCount(), q_len=128, block_size=64)
  q, kv = _specs(Case("x", 1, 128, 128, 1, 1, 64, lambda: mask), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="population_count"):
    _lower(lambda q, k, v: sj.attention(q, k, v, mask,
                                        impl="pallas_mosaic_gpu"), q, kv, kv)


@pytest.mark.parametrize("dtype,head_dim,block,why", [
    (jnp.float32, 128, 128, "bfloat16 or float16"),
    (jnp.bfloat16, 96, 128, "head_dim 64, 128 or 256"),
    (jnp.bfloat16, 128, 32, "multiple of 64"),
])
def test_auto_falls_back_and_explicit_impl_explains(dtype, head_dim, block,
                                                    why, caplog):
  mask = sj.masks.causal(256, block_size=block)
  q = jax.ShapeDtypeStruct((1, 256, 2, head_dim), dtype)
  with sj.target_platform(*H200):
    with pytest.raises(ValueError, match=why):
      jax.eval_shape(lambda q: sj.attention(q, q, q, mask,
                                            impl="pallas_mosaic_gpu"), q)
    with caplog.at_level(logging.INFO):
      impl = REGISTRY.resolve("auto", False,
                                     (dtype, head_dim, block, block))
  assert impl.name == "pallas_triton"
  assert why in caplog.text


def test_auto_prefers_mosaic_on_hopper_only():
  problem = (jnp.bfloat16, 128, 128, 128)
  with sj.target_platform(*H200):
    assert REGISTRY.resolve("auto", False, problem).name == (
        "pallas_mosaic_gpu")
  with sj.target_platform("gpu", "NVIDIA A100-SXM4-80GB"):
    assert REGISTRY.resolve("auto", False, problem).name == (
        "pallas_triton")


def test_tuning_is_validated():
  from pallas_kernels.mosaic_gpu.block_sparse_attention import TuningConfig
  with pytest.raises(ValueError, match="max_concurrent_steps"):
    TuningConfig(max_concurrent_steps=1)
  with pytest.raises(ValueError, match="tile_kv_fwd"):
    TuningConfig(tile_kv_fwd=96)
  with pytest.raises(ValueError, match="compute_wgs_fwd=2"):
    TuningConfig(compute_wgs_fwd=2).wgs("fwd", 128, 64)


# --- GPU: numerics against the reference -------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="runs the wgmma kernels: needs a "
                    "Hopper GPU (CPU coverage: the CUDA lowering tests above)")
class TestMosaicGpu:
  KW = {"impl": "pallas_mosaic_gpu"}

  @pytest.mark.parametrize("dtype", DTYPES)
  @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
  def test_matches_reference(self, case, dtype):
    check_case(self.KW, case, dtype)

  def test_fully_masked_rows_are_zero_with_zero_grads(self):
    (out, lse, dq, dk, dv), mask = check_case(
        self.KW, BY_NAME["fully_masked_rows"], jnp.float16)
    dead = ~np.asarray(mask.to_dense()).any(-1)[0, 0]
    assert dead.sum() >= 40
    assert np.all(np.asarray(out)[:, dead] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[:, :, dead]))
    assert np.all(np.asarray(dq)[:, dead] == 0)
    for g in (out, dq, dk, dv):
      assert np.isfinite(np.asarray(g, np.float32)).all()

  def test_empty_block_row(self):
    (out, lse, *_), _ = check_case(self.KW, BY_NAME["empty_block_row"],
                                   jnp.bfloat16)
    assert np.all(np.asarray(out, np.float32)[:, 64:128] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[:, :, 64:128]))

  @pytest.mark.parametrize("tuning", [
      dict(compute_wgs_fwd=1, compute_wgs_bwd=1),
      dict(tile_kv_fwd=64, tile_kv_dq=64, tile_q_dkv=64,
           max_concurrent_steps=3),
      dict(tile_kv_dq=128, tile_q_dkv=128),
      dict(use_schedule_barrier=False)])
  def test_tunings_match_reference(self, tuning):
    from pallas_kernels.mosaic_gpu.block_sparse_attention import TuningConfig
    check_case(dict(self.KW, tuning=TuningConfig(**tuning)),
               BY_NAME["s2_gqa_d128"], jnp.bfloat16)

  @hypothesis.given(st.data())
  def test_random_block_patterns(self, data):
    case, seed = draw_random_block_case(data, block_sizes=(64, 128),
                                        head_dim=64)
    check_case(self.KW, case, jnp.bfloat16, seed=seed)
