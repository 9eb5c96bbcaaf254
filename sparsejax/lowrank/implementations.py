"""The Scatterbrain implementations, registered by name.

Each Pallas implementation's `unsupported(dtype, head_dim, block_q,
block_kv, num_features, causal, interpret)` says why it cannot run a call,
so `auto` falls back (logging the reason) and an explicit impl raises.
"""

from sparsejax.registry import Implementation, OpRegistry

REGISTRY = OpRegistry("scatterbrain_attention")


def _needs(platform_name, what):
  def check(platform, kind):
    del kind
    return None if platform == platform_name else (
        f"needs {what}, found {platform}")
  return check


def _op(module_name):
  def load():
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module(module_name).attention
  return load


def _unsupported(module_name):
  def check(*problem):
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module(module_name).unsupported(*problem)
  return check


_TRITON = "pallas_kernels.gpu.scatterbrain_attention"
_TPU = "pallas_kernels.tpu.scatterbrain_attention"

REGISTRY.register(Implementation("reference", load=lambda: None, dense=True))
REGISTRY.register(Implementation("xla", load=_op("sparsejax.lowrank.xla")))
REGISTRY.register(Implementation(
    "pallas_triton", load=_op(_TRITON), unavailable=_needs("gpu", "a CUDA GPU"),
    unsupported=_unsupported(_TRITON), supports_interpret=True,
    pad_head_dim_pow2=True))
REGISTRY.register(Implementation(
    "pallas_tpu", load=_op(_TPU), unavailable=_needs("tpu", "a TPU"),
    unsupported=_unsupported(_TPU), supports_interpret=True))


def _pow2_at_least_16(m, interpret):
  del interpret
  return max(16, 1 << max(0, (m - 1).bit_length()))  # Triton dot sizes


def _tpu_lanes(m, interpret):
  return m if interpret else -(-m // 128) * 128  # feature tiles fill lanes


# Feature columns each kernel needs (zero-padded; exact): a table, not a
# branch per implementation.
FEATURE_PAD = {"pallas_triton": _pow2_at_least_16, "pallas_tpu": _tpu_lanes}
