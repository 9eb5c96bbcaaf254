"""The implementations of `block_attention_probs`, registered by name.

There is no Mosaic GPU kernel: the op is a distillation target (one call per
training step of the gates, never on the inference path), and the Triton
kernel serves every CUDA GPU; on GPU, `auto` picks it.
"""

from sparsejax.block_sparse.implementations import needs_cuda, needs_tpu
from sparsejax.registry import Implementation, OpRegistry

PROBS_REGISTRY = OpRegistry("block_attention_probs")


def _load_xla():
  from sparsejax.learned import xla  # pylint: disable=g-import-not-at-top
  return xla.forward


def _load_triton():
  from pallas_kernels.gpu import block_attention_probs  # pylint: disable=g-import-not-at-top
  return block_attention_probs.forward


def _triton_unsupported(*problem):
  from pallas_kernels.gpu import block_attention_probs  # pylint: disable=g-import-not-at-top
  return block_attention_probs.unsupported(*problem)


def _load_tpu():
  from pallas_kernels.tpu import block_attention_probs  # pylint: disable=g-import-not-at-top
  return block_attention_probs.forward


def _tpu_unsupported(*problem):
  from pallas_kernels.tpu import block_attention_probs  # pylint: disable=g-import-not-at-top
  return block_attention_probs.unsupported(*problem)


PROBS_REGISTRY.register(Implementation("reference", load=lambda: None,
                                       dense=True))
PROBS_REGISTRY.register(Implementation("xla", load=_load_xla))
PROBS_REGISTRY.register(Implementation(
    "pallas_triton", load=_load_triton, unavailable=needs_cuda,
    unsupported=_triton_unsupported, supports_interpret=True,
    pad_head_dim_pow2=True))
PROBS_REGISTRY.register(Implementation(
    "pallas_tpu", load=_load_tpu, unavailable=needs_tpu,
    unsupported=_tpu_unsupported, supports_interpret=True))
