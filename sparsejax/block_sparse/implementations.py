"""The block-sparse attention implementations, registered by name.

`unsupported(*problem)` gets problem = (dtype, head_dim, block_q, block_kv,
score_mod, has_segment_ids); each function takes the interface of `vjp`:
fn(q, k, v, lists, params, cfg) -> (out, lse).
"""

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


def _kernel_unsupported(impl):
  """A Pallas kernel's check of the score mod (see score_mods.ScoreMod)."""

  def unsupported(dtype, head_dim, block_q, block_kv, score_mod=None,
                  segments=False):
    del dtype, head_dim, block_q, block_kv, segments
    if score_mod is None:
      return None
    from sparsejax.block_sparse import score_mods  # pylint: disable=g-import-not-at-top
    return score_mods.kernel_unsupported(score_mod, impl)

  return unsupported


def _load_mosaic_gpu():
  from pallas_kernels.mosaic_gpu import block_sparse_attention  # pylint: disable=g-import-not-at-top

  def attention(q, k, v, lists, params, cfg):
    # The kernel has the former interface (no params); `unsupported` keeps
    # score mods and segment ids away from it.
    del params
    return block_sparse_attention.attention(q, k, v, lists, cfg)

  return attention


def _mosaic_gpu_unsupported(dtype, head_dim, block_q, block_kv,
                            score_mod=None, segments=False):
  if score_mod is not None:
    return "score mods are not in the Mosaic GPU kernel yet"
  if segments:
    return "segment ids are not in the Mosaic GPU kernel yet"
  from pallas_kernels.mosaic_gpu import block_sparse_attention  # pylint: disable=g-import-not-at-top
  return block_sparse_attention.unsupported(dtype, head_dim, block_q,
                                            block_kv)


def _load_tpu():
  from pallas_kernels.tpu import block_sparse_attention  # pylint: disable=g-import-not-at-top
  return block_sparse_attention.attention


REGISTRY.register(Implementation("reference", load=lambda: None, dense=True))
REGISTRY.register(Implementation("xla", load=_load_xla))
REGISTRY.register(Implementation(
    "pallas_triton", load=_load_triton, unavailable=needs_cuda,
    unsupported=_kernel_unsupported("pallas_triton"),
    supports_interpret=True, pad_head_dim_pow2=True))
REGISTRY.register(Implementation(
    "pallas_mosaic_gpu", load=_load_mosaic_gpu, unavailable=needs_hopper,
    unsupported=_mosaic_gpu_unsupported))
REGISTRY.register(Implementation(
    "pallas_tpu", load=_load_tpu, unavailable=needs_tpu,
    unsupported=_kernel_unsupported("pallas_tpu"), supports_interpret=True))
