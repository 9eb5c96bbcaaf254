"""The shared vision suites against each implementation."""

import pytest

from tests import vision_test_base as base
from tests.conftest import has_gpu

_GPU = pytest.mark.skipif(not has_gpu(), reason="compiles the GPU kernels: "
                          "needs a CUDA GPU (CPU coverage: the interpret-mode "
                          "classes and the CUDA lowering tests of "
                          "test_vision_semantics.py)")


def pytest_generate_tests(metafunc):
  if "case" in metafunc.fixturenames:
    cases = metafunc.cls.CASES
    metafunc.parametrize("case", cases, ids=[c.name for c in cases])


class TestWindowXla(base.WindowSuite):
  IMPL = "xla"
  CASES = base.WINDOW_CASES[:2]  # block and grid; Triton takes the rest


class TestWindowTritonInterpret(base.WindowSuite):
  IMPL = "pallas_triton"
  INTERPRET = True
  CASES = base.WINDOW_CASES[1:]


class TestWindowTpuInterpret(base.WindowSuite):
  IMPL = "pallas_tpu"
  INTERPRET = True
  CASES = base.WINDOW_CASES[1:2]
  EXTRAS = False


def _na(*names):
  return [c for c in base.NA_CASES if c.name in names]


class TestNeighborhoodXla(base.NeighborhoodSuite):
  IMPL = "xla"
  CASES = _na("1d_even_kernel_dilation", "2d_bias_even_dilation")


class TestNeighborhoodTritonInterpret(base.NeighborhoodSuite):
  IMPL = "pallas_triton"
  INTERPRET = True
  # 1d_causal_bias is 1d_causal_dilation plus the bias (the no-mod kernel
  # path is 2d_nonsquare_dilation's); the GPU class runs every case.
  CASES = _na("2d_nonsquare_dilation", "1d_causal_bias",
              "2d_bias_even_dilation")


class TestNeighborhoodTpuInterpret(base.NeighborhoodSuite):
  IMPL = "pallas_tpu"
  INTERPRET = True
  BIAS_UNSUPPORTED = "vector gather"
  CASES = _na("2d_kernel_equals_map", "1d_causal_bias")


class TestRoutingXla(base.RoutingSuite):
  IMPL = "xla"
  CASES = base.ROUTING_CASES[:1]  # Triton takes the padded top-3 case
  DENSE_CHECK = False  # top-k = all regions: the Triton class checks it


class TestRoutingTritonInterpret(base.RoutingSuite):
  IMPL = "pallas_triton"
  INTERPRET = True
  CASES = base.ROUTING_CASES[1:2]


class TestRoutingTpuInterpret(base.RoutingSuite):
  IMPL = "pallas_tpu"
  INTERPRET = True
  CASES = base.ROUTING_CASES[3:]
  DENSE_CHECK = False


# --- GPU: every case, compiled -----------------------------------------------


@pytest.mark.gpu
@_GPU
class TestWindowTritonGpu(base.WindowSuite):
  IMPL = "pallas_triton"
  DETERMINISM = True


@pytest.mark.gpu
@_GPU
class TestNeighborhoodTritonGpu(base.NeighborhoodSuite):
  IMPL = "pallas_triton"


@pytest.mark.gpu
@_GPU
class TestRoutingTritonGpu(base.RoutingSuite):
  IMPL = "pallas_triton"
