"""The shared attention suite against each implementation."""

import pytest

from tests.attention_test_base import AttentionSuite
from tests.conftest import has_gpu


class TestXla(AttentionSuite):
  IMPL = "xla"


class TestPallasTritonInterpret(AttentionSuite):
  IMPL = "pallas_triton"
  INTERPRET = True


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="compiles the Triton kernels: needs "
                    "a CUDA GPU (CPU coverage: the interpret-mode class above "
                    "and test_triton_lowering.py)")
class TestPallasTritonGpu(AttentionSuite):
  IMPL = "pallas_triton"


class TestPallasTritonSubTiles:
  """Sub-tiled walks (kv columns in fwd/dQ, q rows in dK/dV) still match."""

  def test_sub_tiles_match_reference(self):
    import jax.numpy as jnp
    from pallas_kernels.gpu.block_sparse_attention import TuningConfig
    from tests.attention_cases import CASES_BY_NAME
    from tests.attention_test_base import check_case
    tuning = TuningConfig(sub_kv_fwd=16, sub_kv_dq=16, sub_q_dkv=16)
    check_case({"impl": "pallas_triton", "interpret": True, "tuning": tuning},
               CASES_BY_NAME["causal_ragged_gqa_d48"], jnp.float32)

  def test_bad_sub_tile_is_rejected(self):
    import pytest as _pytest
    from pallas_kernels.gpu.block_sparse_attention import TuningConfig
    with _pytest.raises(ValueError, match="sub_q_dkv"):
      TuningConfig(sub_q_dkv=24).sub("sub_q_dkv", 64)
    with _pytest.raises(ValueError, match="num_warps_fwd"):
      TuningConfig(num_warps_fwd=3)
