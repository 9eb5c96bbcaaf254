"""The shared Scatterbrain suite against each implementation (CPU: xla and
the Pallas kernels in interpret mode; GPU: the Triton kernel compiled)."""

import pytest

from tests.conftest import has_gpu
from tests.lowrank_test_base import ScatterbrainSuite


class TestXla(ScatterbrainSuite):
  IMPL = "xla"


class TestReference(ScatterbrainSuite):
  """The f32 reference against the f64 one (and the corner cases)."""
  IMPL = "reference"
  CASE_NAMES = ("causal_more_keys_gqa",)
  LOW_PRECISION = ("bfloat16",)
  CORNERS = (True,)
  EMPTY_MASKS = ("explicit", "none")


# Interpret mode is slow on CPU: each kernel class runs causal and
# bidirectional calls between its tests (the xla class, the same arithmetic
# in jnp, runs more).
class TestPallasTritonInterpret(ScatterbrainSuite):
  IMPL = "pallas_triton"
  INTERPRET = True
  CASE_NAMES = ("causal_more_keys_gqa",)
  LOW_PRECISION = ("bfloat16",)
  CORNERS = (False,)


class TestPallasTpuInterpret(ScatterbrainSuite):
  IMPL = "pallas_tpu"
  INTERPRET = True
  CASE_NAMES = ("bidir_window_ragged_gqa",)
  LOW_PRECISION = ("bfloat16",)
  CORNERS = (True,)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="compiles the Triton kernels: needs "
                    "a CUDA GPU (CPU coverage: the interpret-mode class and "
                    "test_lowrank_lowering.py)")
class TestPallasTritonGpu(ScatterbrainSuite):
  IMPL = "pallas_triton"
