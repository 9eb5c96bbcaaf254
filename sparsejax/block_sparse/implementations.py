"""The block-sparse attention implementations, registered by name."""

from sparsejax.registry import Implementation, OpRegistry

REGISTRY = OpRegistry("attention")


def _load_xla():
  from sparsejax.block_sparse import xla  # pylint: disable=g-import-not-at-top
  return xla.attention


def _load_triton():
  from pallas_kernels.gpu import block_sparse_attention  # pylint: disable=g-import-not-at-top
  return block_sparse_attention.attention


def needs_cuda(platform, kind):
  del kind
  return None if platform == "gpu" else f"needs a CUDA GPU, found {platform}"


def needs_hopper(platform, kind):
  reason = needs_cuda(platform, kind)
  if reason is None and not any(h in kind for h in ("H100", "H200", "H800",
                                                     "H20", "GH200")):
    reason = f"needs a Hopper (sm90) GPU, found {kind!r}"
  return reason


def needs_tpu(platform, kind):
  del kind
  return None if platform == "tpu" else f"needs a TPU, found {platform}"


def _load_mosaic_gpu():
  from pallas_kernels.mosaic_gpu import block_sparse_attention  # pylint: disable=g-import-not-at-top
  return block_sparse_attention.attention


def _mosaic_gpu_unsupported(*problem):
  from pallas_kernels.mosaic_gpu import block_sparse_attention  # pylint: disable=g-import-not-at-top
  return block_sparse_attention.unsupported(*problem)


def _load_tpu():
  from pallas_kernels.tpu import block_sparse_attention  # pylint: disable=g-import-not-at-top
  return block_sparse_attention.attention


REGISTRY.register(Implementation("reference", load=lambda: None, dense=True))
REGISTRY.register(Implementation("xla", load=_load_xla))
REGISTRY.register(Implementation(
    "pallas_triton", load=_load_triton, unavailable=needs_cuda,
    supports_interpret=True, pad_head_dim_pow2=True))
REGISTRY.register(Implementation(
    "pallas_mosaic_gpu", load=_load_mosaic_gpu, unavailable=needs_hopper,
    unsupported=_mosaic_gpu_unsupported))
REGISTRY.register(Implementation(
    "pallas_tpu", load=_load_tpu, unavailable=needs_tpu,
    supports_interpret=True))
