"""The decode suite against each implementation, CUDA lowering of the
Triton kernel, and the op's argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax.inference import paged_decode
from sparsejax.inference.paged_cache import PagedKVCache, VisitList
from sparsejax.inference.paged_cache import token_view
from tests.conftest import has_gpu
from tests.decode_test_base import BY_NAME, DecodeSuite, make_cache
from tests.decode_test_base import make_lists


def test_reference_matches_float64_numpy():
  """The definition itself, with scores, on two kinds of lists."""
  suite = DecodeSuite()
  suite.IMPL = "reference"
  for name in ("dense_ragged_gqa", "tokens_per_q_head"):
    suite.check(BY_NAME[name], jnp.float32, scores=True)


class TestDecodeXla(DecodeSuite):
  IMPL = "xla"


# Interpret mode compiles slowly on CI's two cores: the kernels run the cases
# that cover their code paths (page gathers, selected pages per kv head,
# per-q-head token lists, the page-1 token view); xla runs all of them. The
# f32 outputs of dense_ragged_gqa and tokens_per_q_head are checked by the
# scores tests (return_scores=True); their bf16 / no-scores runs by the
# bf16 and empty / past-count tests.
_KERNEL_CASES = ("selected_pages_per_kv_head", "tokens_per_kv_head_page1")


class TestDecodeTritonInterpret(DecodeSuite):
  IMPL = "pallas_triton"
  INTERPRET = True
  CASE_NAMES = _KERNEL_CASES


class TestDecodeTritonInterpretSplits(DecodeSuite):
  """Many splits and one-page steps: split edges, empty splits."""
  IMPL = "pallas_triton"
  INTERPRET = True
  CASE_NAMES = ("dense_ragged_gqa", "tokens_per_kv_head_page1")

  @staticmethod
  def TUNING():  # pylint: disable=invalid-name
    from pallas_kernels.gpu.paged_decode import TuningConfig  # pylint: disable=g-import-not-at-top
    return TuningConfig(block_tokens=16, num_splits=8)

  test_matches_reference_bf16 = None
  test_scores_are_group_max_logits = None


class TestDecodeTpuInterpret(DecodeSuite):
  IMPL = "pallas_tpu"
  INTERPRET = True
  CASE_NAMES = ("selected_pages_per_kv_head",)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="compiles the Triton decode "
                    "kernel: needs a CUDA GPU (CPU coverage: the interpret "
                    "classes and the CUDA lowering tests)")
class TestDecodeTritonGpu(DecodeSuite):
  IMPL = "pallas_triton"


# --- CUDA lowering at serving shapes ------------------------------------------

H200 = ("gpu", "NVIDIA H200")


def _lower(page, width, list_heads, *, token=False, scores=False, d=128,
           tuning=None):
  b, hkv, h = 8, 8, 32
  pool = jax.ShapeDtypeStruct((hkv, b * width, page, d), jnp.bfloat16)
  q = jax.ShapeDtypeStruct((b, h, d), jnp.bfloat16)
  lists = VisitList(*[jax.ShapeDtypeStruct(s, jnp.int32) for s in (
      (b, list_heads, width), (b, list_heads, width), (b, list_heads),
      (b, list_heads))])

  def f(q, k, v, lists):
    if token:
      k, v = token_view(k), token_view(v)
    return paged_decode.paged_decode_attention(
        q, k, v, lists, impl="pallas_triton", return_scores=scores,
        tuning=tuning)

  with sj.target_platform(*H200):
    return jax.jit(f).trace(q, pool, pool, lists).lower(
        lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("page,width,list_heads,token,scores", [
    (16, 2048, 1, False, False),   # dense 32K, page 16
    (64, 512, 8, False, True),     # dense 32K, page 64, with scores
    (16, 128, 8, False, False),    # Quest 2K budget per kv head
    (16, 2048, 8, True, False),    # token lists (DS / TidalDecode)
])
def test_triton_kernel_lowers_for_cuda(page, width, list_heads, token,
                                       scores):
  assert _lower(page, width, list_heads, token=token,
                scores=scores).count("xla.gpu.triton") == 1


def test_triton_tuning_lowers_and_validates():
  from pallas_kernels.gpu.paged_decode import TuningConfig  # pylint: disable=g-import-not-at-top
  tuning = TuningConfig(block_tokens=256, num_splits=32, num_warps=8,
                        num_stages=3)
  assert "xla.gpu.triton" in _lower(16, 2048, 1, tuning=tuning)
  with pytest.raises(ValueError, match="block_tokens"):
    TuningConfig(block_tokens=48)
  with pytest.raises(ValueError, match="num_splits"):
    TuningConfig(num_splits=3)
  with pytest.raises(ValueError, match="num_warps"):
    TuningConfig(num_warps=3)
  # Splits: about target_programs programs, at least min_steps steps each.
  assert TuningConfig().splits(64, 256) == 16
  assert TuningConfig().splits(64, 16) == 8
  assert TuningConfig(min_steps=4).splits(64, 16) == 4
  assert TuningConfig(num_splits=2).splits(64, 256) == 2


# --- argument checks and auto --------------------------------------------------


def _small():
  case = BY_NAME["dense_ragged_gqa"]
  cache, q = make_cache(case, jnp.float32)
  return case, cache, q, make_lists(case, cache)[2]


def test_bad_arguments_name_what_is_wrong():
  _, cache, q, lists = _small()
  k, v = cache.k_pages, cache.v_pages
  f = paged_decode.paged_decode_attention
  with pytest.raises(ValueError, match="impl must be one of"):
    f(q, k, v, lists, impl="cuda")
  with pytest.raises(ValueError, match="multiple of kv heads"):
    f(q[:, :3], k, v, lists, impl="xla")
  with pytest.raises(ValueError, match="head_dim"):
    f(q[..., :8], k, v, lists, impl="xla")
  with pytest.raises(ValueError, match="list heads"):
    f(q, k, v, VisitList(*(jnp.repeat(x, 3, 1) for x in lists)), impl="xla")
  with pytest.raises(ValueError, match="lists.counts"):
    f(q, k, v, lists._replace(counts=lists.counts[:, 0]), impl="xla")
  with pytest.raises(ValueError, match="interpret=True needs a Pallas"):
    f(q, k, v, lists, impl="xla", interpret=True)
  with pytest.raises(ValueError, match="power of two"):  # Triton's rule
    f(jnp.zeros((3, 4, 24)), jnp.zeros((2, 36, 8, 24)),
      jnp.zeros((2, 36, 8, 24)), lists, impl="pallas_triton", interpret=True)


def test_auto_falls_back_to_xla_on_cpu():
  case, cache, q, lists = _small()
  f = lambda impl: jax.jit(lambda q, k, v, lists: (
      paged_decode.paged_decode_attention(q, k, v, lists, impl=impl)))(
          q, cache.k_pages, cache.v_pages, lists)
  got, want = f("auto"), f("reference")
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert case.lists == "dense"
