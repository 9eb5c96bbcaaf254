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
