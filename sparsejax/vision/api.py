"""`sj.vision`: MaxViT block/grid, neighborhood and BiFormer routing attention.

Layout is heads-last, as NATTEN's: images [batch, X, Y, heads, head_dim],
sequences [batch, L, heads, head_dim]. Every op takes `scale=None`
(head_dim ** -0.5), `impl="auto"` ("reference", "xla", "pallas_triton",
"pallas_mosaic_gpu", "pallas_tpu") and `interpret=False`, and is
differentiable (gradients reach q, k, v and the bias tables). Softmax is in
f32 whatever the input dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple, Union

import jax.numpy as jnp

from sparsejax.parallel import per_shard
from sparsejax.vision import implementations as impls
from sparsejax.vision import natten
from sparsejax.vision import permute
from sparsejax.vision import relative_bias
from sparsejax.vision import routing

Pair = Union[int, Tuple[int, int]]
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check_qkv(q, k, v, ranks, impl):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "ndim") or x.ndim not in ranks:
      raise ValueError(f"{name} must have rank {' or '.join(map(str, ranks))}"
                       f" (heads-last), got shape {getattr(x, 'shape', None)}")
    allowed = _DTYPES + ((jnp.float64,) if impl == "reference" else ())
    if x.dtype not in allowed:
      raise TypeError(f"{name} must be float32, bfloat16 or float16 (float64 "
                      f"with impl='reference'), got {x.dtype}")
  if not q.shape == k.shape == v.shape:
    raise ValueError(f"q, k, v must have one shape, got {q.shape}, {k.shape},"
                     f" {v.shape}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                    f"{v.dtype}")


def _scale(scale, d):
  return float(d ** -0.5 if scale is None else scale)


def _check_impl(impl):
  if not isinstance(impl, str):
    raise ValueError(f"impl must be a string, got {impl!r}")


# --- MaxViT -------------------------------------------------------------------


def _windowed(q, k, v, layout, rel_bias, scale, impl, interpret, tuning):
  heads, d = q.shape[-2], q.shape[-1]
  if rel_bias is not None:
    relative_bias.check_table(rel_bias, heads, layout.window)
  implementation = impls.WINDOW.resolve(
      impl, interpret, problem=(q.dtype, d, layout.tokens,
                                rel_bias is not None))
  run = functools.partial(implementation.load(), layout=layout,
                          scale=_scale(scale, d), interpret=interpret,
                          tuning=tuning)
  # Per (batch, head) shard under a device mesh (sparsejax.parallel).
  return per_shard(lambda q, k, v, table: run(q, k, v, table=table),
                   ("b..h.",) * 3 + ("h",), "b..h.", "window_attention")(
                       q, k, v, rel_bias)


def block_attention(q, k, v, window: Pair, *, rel_bias=None,
                    scale: Optional[float] = None, impl: str = "auto",
                    interpret: bool = False, tuning=None):
  """MaxViT block attention on images [B, X, Y, H, D].

  Token (h, w) belongs to window (h // P1, w // P2) at position
  (h % P1, w % P2); full attention inside each window. `rel_bias`
  [H (or 1), 2P1-1, 2P2-1] adds rel_bias[n, x - i + P1 - 1, y - j + P2 - 1]
  for query (i, j) and key (x, y) in window coordinates (key minus query:
  google-research/maxvit's layout, so its checkpoints load). `tuning`: the
  kernel's TuningConfig (pallas_kernels.<gpu|tpu>.window_attention).
  """
  _check_impl(impl)
  _check_qkv(q, k, v, (5,), impl)
  window = permute.as_pair(window, "window")
  shape = q.shape[1:3]
  if shape[0] % window[0] or shape[1] % window[1]:
    raise ValueError(f"window {window} must divide the feature map {shape}")
  layout = permute.WindowLayout("block", shape, window)
  return _windowed(q, k, v, layout, rel_bias, scale, impl, interpret, tuning)


def grid_attention(q, k, v, grid: Pair, *, rel_bias=None,
                   scale: Optional[float] = None, impl: str = "auto",
                   interpret: bool = False, tuning=None):
  """MaxViT grid attention on images [B, X, Y, H, D].

  With step (X/G1, Y/G2), token (h, w) belongs to group
  (h % (X/G1), w % (Y/G2)) at position (h // (X/G1), w // (Y/G2)); full
  attention inside each group (a G1 x G2 dilated lattice). `rel_bias`
  [H (or 1), 2G1-1, 2G2-1] is indexed by those positions as in
  `block_attention`.
  """
  _check_impl(impl)
  _check_qkv(q, k, v, (5,), impl)
  grid = permute.as_pair(grid, "grid")
  shape = q.shape[1:3]
  if shape[0] % grid[0] or shape[1] % grid[1]:
    raise ValueError(f"grid {grid} must divide the feature map {shape}")
  layout = permute.WindowLayout("grid", shape, grid)
  return _windowed(q, k, v, layout, rel_bias, scale, impl, interpret, tuning)


def window_attention(q, k, v, window: Pair, *, rel_bias=None,
                     scale: Optional[float] = None, impl: str = "auto",
                     interpret: bool = False, tuning=None):
  """Attention inside pre-partitioned windows [B, nW, P1*P2, H, D].

  The output of `permute.window_partition` / `grid_partition`; positions are
  row-major over (P1, P2) for the bias, as in `block_attention`.
  """
  _check_impl(impl)
  _check_qkv(q, k, v, (5,), impl)
  window = permute.as_pair(window, "window")
  if q.shape[2] != window[0] * window[1]:
    raise ValueError(f"window {window} has {window[0] * window[1]} tokens, "
                     f"but q has {q.shape[2]} per window")
  layout = permute.WindowLayout("contiguous", tuple(q.shape[1:3]), window)
  return _windowed(q, k, v, layout, rel_bias, scale, impl, interpret, tuning)


# --- neighborhood attention --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NASpec:
  """Static description of one neighborhood-attention call."""
  shape: Tuple[int, ...]
  kernel: Tuple[int, ...]
  dilation: Tuple[int, ...]
  causal: Tuple[bool, ...]
  tile: Tuple[int, ...]

  @property
  def layout(self) -> permute.TileLayout:
    return permute.TileLayout(self.shape, self.dilation, self.tile)


def _per_axis(value, n, name, kind):
  out = (value,) * n if isinstance(value, kind) else tuple(value)
  if len(out) != n or not all(isinstance(x, kind) for x in out):
    raise ValueError(f"{name} must be a {kind.__name__} or {n} of them, got "
                     f"{value!r}")
  return out


def default_tile(ndim: int, head_dim: int) -> Tuple[int, ...]:
  """NATTEN's Hopper tiles: 1-D 64 (d <= 64) or 128; 2-D 8x8 or 16x8."""
  if ndim == 1:
    return (64,) if head_dim <= 64 else (128,)
  return (8, 8) if head_dim <= 64 else (16, 8)


def neighborhood_attention(q, k, v, kernel_size, *, dilation=1, causal=False,
                           rel_bias=None, scale: Optional[float] = None,
                           impl: str = "auto", interpret: bool = False,
                           tile_shape=None):
  """Neighborhood attention with NATTEN's semantics, 1-D or 2-D.

  q, k, v: [B, L, H, D] or [B, X, Y, H, D]. Per axis (kernel_size,
  dilation and causal may be per-axis tuples): dilation splits tokens into
  groups by coordinate mod d; each query sees exactly kernel_size keys of
  its group, the window shifted (not cut) at the borders; even kernels cover
  k/2 keys before and k/2 - 1 after; causal keeps 0 <= q - kv < kernel_size
  within the group. `rel_bias` [H (or 1), 2K-1(, 2K-1)] adds
  rel_bias[n, kv - q + K - 1, ...] (key minus query, in group coordinates:
  NATTEN's legacy rpb), fused in the kernels as a score mod with its
  gradient (`natten.NeighborhoodBias`; Triton, xla; not TPU or Mosaic GPU).
  `tile_shape`: the token tile of the permuted layout (a block of the
  block-sparse kernels; its size a power of two >= 16).
  """
  _check_impl(impl)
  _check_qkv(q, k, v, (4, 5), impl)
  n = q.ndim - 3
  shape = tuple(q.shape[1:1 + n])
  heads, d = q.shape[-2], q.shape[-1]
  kernel = _per_axis(kernel_size, n, "kernel_size", int)
  dilation = _per_axis(dilation, n, "dilation", int)
  causal = _per_axis(causal, n, "causal", bool)
  for a in range(n):
    if dilation[a] < 1:
      raise ValueError(f"dilation must be >= 1, got {dilation}")
    if not 1 <= kernel[a] or kernel[a] * dilation[a] > shape[a]:
      raise ValueError(f"kernel_size {kernel} times dilation {dilation} must "
                       f"be in [1, {shape}] per axis, got "
                       f"{kernel[a] * dilation[a]} on axis {a}")
  tile = default_tile(n, d) if tile_shape is None else _per_axis(
      tile_shape, n, "tile_shape", int)
  size = 1
  for t in tile:
    size *= t
  if size < 16 or size & (size - 1):
    raise ValueError(f"tile_shape {tile} must hold a power of two >= 16 "
                     f"tokens")
  if rel_bias is not None:
    want = (2 * kk - 1 for kk in kernel)
    want = tuple(want)
    got = getattr(rel_bias, "shape", None)
    if got is None or len(got) != 1 + n or tuple(got[1:]) != want or (
        got[0] not in (1, heads)):
      raise ValueError(f"rel_bias must be [heads={heads} (or 1), "
                       f"{', '.join(map(str, want))}] for kernel_size "
                       f"{kernel}, got {got}")
  spec = NASpec(shape, kernel, dilation, causal, tile)
  bias_mod = None if rel_bias is None else natten.NeighborhoodBias.create(
      rel_bias, spec.layout, kernel, heads)
  implementation = impls.NEIGHBORHOOD.resolve(
      impl, interpret, problem=(q.dtype, d, size, bias_mod))
  return implementation.load()(q, k, v, spec, rel_bias, _scale(scale, d),
                               interpret)


# --- BiFormer routing --------------------------------------------------------


def routing_attention(q, k, v, num_regions: int, topk: int, *,
                      scale: Optional[float] = None, impl: str = "auto",
                      interpret: bool = False):
  """BiFormer bi-level routing attention on images [B, X, Y, H, D].

  The map is cut into num_regions x num_regions regions; region means of q
  and k over all heads' channels (no gradient), their affinity, and the topk
  regions per query region (one table per image, shared by the heads,
  chosen under jit) decide which regions' tokens each query attends. The
  routed regions are a traced BlockMask over region-major tokens: memory is
  O(N d), no k-fold gather. scale defaults to head_dim ** -0.5; BiFormer's
  own is (heads * head_dim) ** -0.5: pass `scale=(H * D) ** -0.5`.
  topk = num_regions ** 2 is dense attention.
  """
  _check_impl(impl)
  _check_qkv(q, k, v, (5,), impl)
  region = routing.region_shape(q.shape[1:3], num_regions)
  routing.check_topk(topk, num_regions)
  d = q.shape[-1]
  block = routing.block_size(region[0] * region[1])
  implementation = impls.ROUTING.resolve(impl, interpret,
                                         problem=(q.dtype, d, block))
  return implementation.load()(q, k, v, num_regions, topk, _scale(scale, d),
                               interpret)
