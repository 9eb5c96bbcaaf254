"""The vision ops' implementations, one `OpRegistry` per op.

window_attention (MaxViT block and grid): a dedicated batched-window kernel
  on Triton and TPU (many windows per program, bias tile fused, its gradient
  accumulated per program); xla = per-window einsums; Mosaic GPU = the
  block-sparse core's Hopper kernel with windows as batch (no bias: that
  would need a table gather in it).
neighborhood_attention, routing_attention: token permutation + a BlockMask
  through the block-sparse core (`sj.attention`) with the same impl name;
  NA's relative bias is a score mod of the core (`natten.NeighborhoodBias`),
  fused in the Triton kernel (TPU and Mosaic GPU lack its vector gather:
  they say why and auto falls back).

Problems (the `unsupported` arguments):
  window:   (dtype, head_dim, tokens_per_window, has_bias)
  na:       (dtype, head_dim, block, bias mod or None)
  routing:  (dtype, head_dim, block)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparsejax.block_sparse import implementations as core_impls
from sparsejax.block_sparse.api import attention as core_attention
from sparsejax.block_sparse.block_mask import next_power_of_2
from sparsejax.registry import Implementation, OpRegistry
from sparsejax.vision import natten
from sparsejax.vision import permute
from sparsejax.vision import reference
from sparsejax.vision import relative_bias
from sparsejax.vision import routing
from sparsejax.vision import xla

WINDOW = OpRegistry("window_attention")
NEIGHBORHOOD = OpRegistry("neighborhood_attention")
ROUTING = OpRegistry("routing_attention")

_UNAVAILABLE = {"pallas_triton": core_impls.needs_cuda,
                "pallas_mosaic_gpu": core_impls.needs_hopper,
                "pallas_tpu": core_impls.needs_tpu}
_NO_SCORE_MODS = ("a relative bias: this path (windows as the batch of the "
                  "core's Mosaic GPU kernel) takes none; pallas_triton fuses "
                  "the bias")


def _core_unsupported(name, dtype, head_dim, block):
  impl = core_impls.REGISTRY.get(name)
  return impl.unsupported(dtype, head_dim, block, block)


# --- window attention ---------------------------------------------------------
# fn(q, k, v, layout, table, scale, interpret, tuning) -> out (q's layout).


def _window_reference(q, k, v, layout, table, scale, interpret, tuning):
  del interpret, tuning
  return reference.window_reference(q, k, v, layout.kind, layout.window,
                                    table, scale)


def _bias(table, layout):
  return None if table is None else relative_bias.bias_matrix(table,
                                                              layout.window)


def _window_xla(q, k, v, layout, table, scale, interpret, tuning):
  del interpret, tuning
  return xla.window_attention(q, k, v, layout, _bias(table, layout), scale)


def _window_kernel(module):
  def run(q, k, v, layout, table, scale, interpret, tuning):
    mod = __import__(f"pallas_kernels.{module}.window_attention",
                     fromlist=["window_attention"])
    return mod.window_attention(q, k, v, layout, _bias(table, layout), scale,
                                interpret=interpret, tuning=tuning)
  return run


def _window_through_core(q, k, v, layout, table, scale, interpret, tuning):
  """Windows as the batch of the core kernel (no bias)."""
  del table, interpret, tuning
  b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
  if layout.kind != "contiguous":
    part, unpart = xla._PARTITION[layout.kind]  # pylint: disable=protected-access
    q, k, v = (part(x, layout.window) for x in (q, k, v))
  t = layout.tokens
  out = core_attention(*(x.reshape(-1, t, h, d) for x in (q, k, v)),
                       scale=scale, impl="pallas_mosaic_gpu")
  out = out.reshape(b, -1, t, h, d)
  if layout.kind != "contiguous":
    out = unpart(out, layout.window, layout.map_shape)
  return out


def _triton_window_unsupported(dtype, head_dim, tokens, has_bias):
  del dtype, has_bias
  if head_dim < 16 or head_dim & (head_dim - 1) or head_dim > 256:
    return f"needs head_dim a power of two in [16, 256], got {head_dim}"
  if tokens > 256:
    return f"keeps a window's scores in registers: at most 256 tokens, got " \
           f"{tokens}"
  return None


def _mosaic_window_unsupported(dtype, head_dim, tokens, has_bias):
  if has_bias:
    return _NO_SCORE_MODS
  block = min(128, next_power_of_2(max(tokens, 16)))
  return _core_unsupported("pallas_mosaic_gpu", dtype, head_dim, block)


WINDOW.register(Implementation("reference", load=lambda: _window_reference,
                               dense=True))
WINDOW.register(Implementation("xla", load=lambda: _window_xla))
WINDOW.register(Implementation(
    "pallas_triton", load=lambda: _window_kernel("gpu"),
    unavailable=_UNAVAILABLE["pallas_triton"],
    unsupported=_triton_window_unsupported, supports_interpret=True))
WINDOW.register(Implementation(
    "pallas_mosaic_gpu", load=lambda: _window_through_core,
    unavailable=_UNAVAILABLE["pallas_mosaic_gpu"],
    unsupported=_mosaic_window_unsupported))
WINDOW.register(Implementation(
    "pallas_tpu", load=lambda: _window_kernel("tpu"),
    unavailable=_UNAVAILABLE["pallas_tpu"], supports_interpret=True))


# --- neighborhood attention ---------------------------------------------------
# fn(q, k, v, spec, table, scale, interpret) with spec = NASpec.


@functools.lru_cache(maxsize=64)
def na_block_mask(layout, kernel, causal):
  """Cached: the lists are static data of (layout, kernel, causal), built
  eagerly even when first asked for inside a jit trace."""
  with jax.ensure_compile_time_eval():
    return natten.block_mask(layout, kernel, causal)


def _na_reference(q, k, v, spec, table, scale, interpret):
  del interpret
  return reference.neighborhood_reference(q, k, v, spec.kernel,
                                          spec.dilation, spec.causal, table,
                                          scale)


def _na_core(name):
  def run(q, k, v, spec, table, scale, interpret):
    layout = spec.layout
    qp, kp, vp = (permute.na_tile_permute(x, layout) for x in (q, k, v))
    mask = na_block_mask(layout, spec.kernel, spec.causal)
    mod = None if table is None else natten.NeighborhoodBias.create(
        table, layout, spec.kernel, q.shape[-2])
    out = core_attention(qp, kp, vp, mask, scale=scale, score_mod=mod,
                         impl=name, interpret=interpret)
    return permute.na_tile_unpermute(out, layout)
  return run


def _na_unsupported(name):
  def why(dtype, head_dim, block, bias_mod):
    impl = core_impls.REGISTRY.get(name)
    return impl.unsupported(dtype, head_dim, block, block, bias_mod)
  return why


NEIGHBORHOOD.register(Implementation("reference", load=lambda: _na_reference,
                                     dense=True))
for _name in ("xla", "pallas_triton", "pallas_mosaic_gpu", "pallas_tpu"):
  NEIGHBORHOOD.register(Implementation(
      _name, load=functools.partial(_na_core, _name),
      unavailable=_UNAVAILABLE.get(_name, lambda p, k: None),
      unsupported=_na_unsupported(_name),
      supports_interpret=_name in ("pallas_triton", "pallas_tpu")))


# --- routing attention -------------------------------------------------------
# fn(q, k, v, num_regions, topk, scale, interpret) -> out [B, X, Y, H, D].


def _routing_reference(q, k, v, num_regions, topk, scale, interpret):
  del interpret
  return reference.routing_reference(q, k, v, num_regions, topk, scale)


def _routing_core(name):
  def run(q, k, v, num_regions, topk, scale, interpret):
    shape = q.shape[1:3]
    region = routing.region_shape(shape, num_regions)
    tokens = region[0] * region[1]
    block = routing.block_size(tokens)
    idx = routing.route(q, k, num_regions, topk)
    mask = routing.routing_block_mask(idx, num_regions, tokens)
    qr, kr, vr = (routing.to_regions(x, region, block) for x in (q, k, v))
    out = core_attention(qr, kr, vr, mask, scale=scale, impl=name,
                         interpret=interpret)
    return routing.from_regions(out, region, block, shape)
  return run


ROUTING.register(Implementation("reference", load=lambda: _routing_reference,
                                dense=True))
for _name in ("xla", "pallas_triton", "pallas_mosaic_gpu", "pallas_tpu"):
  ROUTING.register(Implementation(
      _name, load=functools.partial(_routing_core, _name),
      unavailable=_UNAVAILABLE.get(_name, lambda p, k: None),
      unsupported=functools.partial(_core_unsupported, _name),
      supports_interpret=_name in ("pallas_triton", "pallas_tpu")))

del _name, jnp
