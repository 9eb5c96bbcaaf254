"""The decode-attention implementations, registered by name.

`DECODE` serves `paged_decode_attention` (every decode path of the
package). A kernel's `unsupported(dtype, head_dim, page, list_heads, rows,
width, interpret)` says why it cannot run a call, so impl="auto" falls back
(logged) and an explicit impl raises with that reason.
"""

from sparsejax.block_sparse.implementations import needs_cuda, needs_tpu
from sparsejax.registry import Implementation, OpRegistry

DECODE = OpRegistry("paged_decode")


def _load_reference():
  from sparsejax.inference import paged_decode  # pylint: disable=g-import-not-at-top
  return paged_decode.decode_reference


def _load_xla():
  from sparsejax.inference import paged_decode  # pylint: disable=g-import-not-at-top
  return paged_decode.decode_xla


def _load_triton():
  from pallas_kernels.gpu import paged_decode  # pylint: disable=g-import-not-at-top
  return paged_decode.decode


def _triton_unsupported(*problem):
  from pallas_kernels.gpu import paged_decode  # pylint: disable=g-import-not-at-top
  return paged_decode.unsupported(*problem)


def _load_tpu():
  from pallas_kernels.tpu import paged_decode  # pylint: disable=g-import-not-at-top
  return paged_decode.decode


def _tpu_unsupported(*problem):
  from pallas_kernels.tpu import paged_decode  # pylint: disable=g-import-not-at-top
  return paged_decode.unsupported(*problem)


DECODE.register(Implementation("reference", load=_load_reference,
                               dense=True))
DECODE.register(Implementation("xla", load=_load_xla))
DECODE.register(Implementation(
    "pallas_triton", load=_load_triton, unavailable=needs_cuda,
    unsupported=_triton_unsupported, supports_interpret=True))
DECODE.register(Implementation(
    "pallas_tpu", load=_load_tpu, unavailable=needs_tpu,
    unsupported=_tpu_unsupported, supports_interpret=True))
