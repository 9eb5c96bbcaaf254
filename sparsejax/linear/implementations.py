"""The lightning-attention and decode implementations, registered by name.

Every implementation of `REGISTRY` is a function
  (q, k, v, slopes, initial_state, *, scale, chunk_size, return_final_state,
   interpret, tuning) -> (o, final_state or None)
on unpadded [B, T, H, d] inputs; every one of `DECODE_REGISTRY` is
  (q, k, v, state, slopes, *, scale, interpret, tuning) -> (o, new_state).
"""

from sparsejax.block_sparse.implementations import needs_cuda, needs_tpu
from sparsejax.registry import Implementation, OpRegistry

REGISTRY = OpRegistry("lightning_attention")
DECODE_REGISTRY = OpRegistry("lightning_decode")


def _reference(q, k, v, slopes, initial_state, *, scale, chunk_size=None,
               return_final_state=False, interpret=False, tuning=None):
  del chunk_size, interpret, tuning
  from sparsejax.linear import reference  # pylint: disable=g-import-not-at-top
  o, final = reference.lightning_recurrence(q, k, v, slopes, scale=scale,
                                            initial_state=initial_state)
  return o, (final if return_final_state else None)


def _load_xla():
  from sparsejax.linear import xla  # pylint: disable=g-import-not-at-top
  return xla.lightning_attention


def _triton_module():
  from pallas_kernels.gpu import lightning_attention  # pylint: disable=g-import-not-at-top
  return lightning_attention


def _tpu_module():
  from pallas_kernels.tpu import lightning_attention  # pylint: disable=g-import-not-at-top
  return lightning_attention


def _decode_reference(q, k, v, state, slopes, *, scale, interpret=False,
                      tuning=None):
  del interpret, tuning
  from sparsejax.linear import reference  # pylint: disable=g-import-not-at-top
  return reference.decode_reference(q, k, v, state, slopes, scale=scale)


REGISTRY.register(Implementation("reference", load=lambda: _reference,
                                 dense=True))
REGISTRY.register(Implementation("xla", load=_load_xla))
REGISTRY.register(Implementation(
    "pallas_triton", load=lambda: _triton_module().lightning_attention,
    unavailable=needs_cuda,
    unsupported=lambda *p: _triton_module().unsupported(*p),
    supports_interpret=True, pad_head_dim_pow2=True))
REGISTRY.register(Implementation(
    "pallas_tpu", load=lambda: _tpu_module().lightning_attention,
    unavailable=needs_tpu,
    unsupported=lambda *p: _tpu_module().unsupported(*p),
    supports_interpret=True))

DECODE_REGISTRY.register(Implementation(
    "reference", load=lambda: _decode_reference, dense=True))
DECODE_REGISTRY.register(Implementation("xla", load=lambda: _decode_reference))
DECODE_REGISTRY.register(Implementation(
    "pallas_triton", load=lambda: _triton_module().decode,
    unavailable=needs_cuda,
    unsupported=lambda *p: _triton_module().unsupported_decode(*p),
    supports_interpret=True))
DECODE_REGISTRY.register(Implementation(
    "pallas_tpu", load=lambda: _tpu_module().decode,
    unavailable=needs_tpu,
    unsupported=lambda *p: _tpu_module().unsupported_decode(*p),
    supports_interpret=True))
