"""MoA (Fu et al., CoLM 2025): per-head elastic attention spans.

Head h of a layer attends a sink (the first tokens) plus a local window,
with span S_h(N) = alpha_h + beta_h * N for a context of N tokens (input
plus new tokens), clipped to [min_span, N] and rounded up to `round_to`;
sink = min(S, sink_size), window = S - sink (the official
`moa_config_to_cache_config` rule, 64 / 128 / 64). The token rule, causal:

  kv visible from q iff kv <= q and (kv < sink_h or q - kv < window_h).

Prefill uses it as a BlockMask (`moa_mask`, through `sj.masks.from_mask_fn`
with an element mask evaluated in the kernels). Decode keeps per kv head
only what it can still see (`MoAKVCache`, compacted the way `S2KVCache`
is): sink slots [0, sink) and a ring of `window` slots, so sequence b's
kv head h holds min(length, sink + window) tokens and decode reads exactly
those, through the paged kernel (each (sequence, head) region a run of
`block`-token pages). Spans are per kv head: the cache is shared by the
group (MoA profiles per attention head of MHA models).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.block_sparse import masks
from sparsejax.inference import selection
from sparsejax.inference.paged_cache import VisitList
from sparsejax.inference.paged_decode import paged_decode_attention
from sparsejax.inference.s2_cache import _concrete  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class MoASpans:
  """One layer's elastic spans: alpha + beta * N tokens per kv head."""
  alphas: Tuple[float, ...]
  betas: Tuple[float, ...]
  min_span: int = 128
  round_to: int = 64
  sink_size: int = 64

  def __post_init__(self):
    object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
    object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
    if len(self.alphas) != len(self.betas) or not self.alphas:
      raise ValueError(f"alphas and betas must be equal-length non-empty, got"
                       f" {len(self.alphas)} and {len(self.betas)}")
    if any(b < 0 for b in self.betas):
      raise ValueError(f"betas must be >= 0, got {self.betas}")
    for name in ("min_span", "round_to", "sink_size"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive int")

  @property
  def num_kv_heads(self) -> int:
    return len(self.alphas)

  def spans(self, n: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(sinks, windows) per kv head at context length n."""
    sinks, windows = [], []
    for a, b in zip(self.alphas, self.betas):
      s = max(self.min_span, a + b * n)
      s = -(-int(np.ceil(s)) // self.round_to) * self.round_to
      s = min(s, n)
      sink = min(s, self.sink_size)
      sinks.append(sink)
      windows.append(s - sink)
    return tuple(sinks), tuple(windows)

  def density(self, n: int) -> float:
    """Mean fraction of the causal (q, kv) pairs visible at length n."""
    sinks, windows = self.spans(n)
    return float(np.mean([visible_pairs(s, w, n) for s, w in
                          zip(sinks, windows)])) / (n * (n + 1) / 2)


def visible_pairs(sink: int, window: int, n: int) -> int:
  """Causal (q, kv) pairs visible under one head's (sink, window) rule."""
  q = np.arange(n)
  local = np.minimum(q + 1, window)
  below = np.minimum(sink, np.maximum(q + 1 - window, 0))  # sinks before it
  return int((local + below).sum())


def _per_head(values, h):
  """values[h] for a traced head index, by selects (kernel-safe, no table)."""
  out = jnp.zeros_like(h) + values[0]
  for i, val in enumerate(values[1:], 1):
    out = jnp.where(h == i, val, out)
  return out


@dataclasses.dataclass(frozen=True)
class MoAMaskFn:
  """The MoA token rule per q head (a hashable element mask)."""
  sinks: Tuple[int, ...]  # per q head
  windows: Tuple[int, ...]

  def __call__(self, b, h, q, kv):
    del b
    sink, window = _per_head(self.sinks, h), _per_head(self.windows, h)
    return (kv <= q) & ((kv < sink) | (q - kv < window))


def moa_mask(seq_len: int, num_heads: int, spans: MoASpans, *,
             context_len: Optional[int] = None, block_size: int = 64):
  """The prefill BlockMask of one layer (spans taken at context_len, default
  seq_len)."""
  g = num_heads // spans.num_kv_heads
  sinks, windows = spans.spans(context_len or seq_len)
  fn = MoAMaskFn(tuple(np.repeat(sinks, g).tolist()),
                 tuple(np.repeat(windows, g).tolist()))
  return masks.from_mask_fn(fn, q_len=seq_len, num_heads=num_heads,
                            block_size=block_size)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k", "v", "lengths", "overflowed"],
                   meta_fields=["sinks", "windows", "max_len", "block"])
@dataclasses.dataclass(frozen=True)
class MoAKVCache:
  """Per-kv-head compacted cache: sink slots, then a ring of window slots."""
  k: jax.Array  # [Hkv, B, C, D], C = max over heads of sink + window
  v: jax.Array
  lengths: jax.Array  # int32 [B]
  overflowed: jax.Array  # bool [B]
  sinks: Tuple[int, ...]
  windows: Tuple[int, ...]
  max_len: int
  block: int  # decode reads each (sequence, head) region in these pages

  @classmethod
  def create(cls, batch: int, max_len: int, num_kv_heads: int,
             head_dim: int, dtype, spans: MoASpans, *,
             block: int = 64) -> "MoAKVCache":
    """Spans are taken at N = max_len (input plus new tokens, as MoA)."""
    if spans.num_kv_heads != num_kv_heads:
      raise ValueError(f"spans has {spans.num_kv_heads} kv heads, expected "
                       f"{num_kv_heads}")
    if batch < 1 or max_len < 1:
      raise ValueError(f"batch and max_len must be >= 1, got {batch}, "
                       f"{max_len}")
    sinks, windows = spans.spans(max_len)
    cap = max(s + w for s, w in zip(sinks, windows))
    cap = -(-cap // block) * block
    z = jnp.zeros((num_kv_heads, batch, cap, head_dim), dtype)
    return cls(z, z, jnp.zeros((batch,), jnp.int32),
               jnp.zeros((batch,), bool), sinks, windows, int(max_len),
               int(block))

  @property
  def capacity(self) -> int:
    return self.k.shape[2]

  def kv_bytes(self) -> int:
    return 2 * int(np.prod(self.k.shape)) * jnp.dtype(self.k.dtype).itemsize

  def held_tokens(self) -> jax.Array:
    """int32 [B, Hkv]: tokens each (sequence, kv head) holds and decode
    reads."""
    caps = jnp.asarray([s + w for s, w in zip(self.sinks, self.windows)])
    return jnp.minimum(self.lengths[:, None], caps[None]).astype(jnp.int32)

  def prefill(self, k, v, lengths) -> "MoAKVCache":
    """Replaces the contents with prompts k, v [B, L, Hkv, D]."""
    b, hkv, d = self.k.shape[1], self.k.shape[0], self.k.shape[3]
    if k.shape != v.shape or k.ndim != 4 or (k.shape[0], k.shape[2],
                                             k.shape[3]) != (b, hkv, d):
      raise ValueError(f"k and v must be [batch={b}, L, kv_heads={hkv}, "
                       f"head_dim={d}], got {k.shape} and {v.shape}")
    if k.shape[1] > self.max_len:
      raise ValueError(f"prompt length {k.shape[1]} exceeds the cache's "
                       f"max_len {self.max_len}")
    lengths = jnp.asarray(lengths, jnp.int32)
    lens = _concrete(lengths)
    if lens is not None and (lens.shape != (b,) or (lens < 0).any() or
                             (lens > k.shape[1]).any()):
      raise ValueError(f"lengths must be [batch={b}] ints in [0, "
                       f"{k.shape[1]}], got {lens}")
    return _prefill(self, k.astype(self.k.dtype), v.astype(self.k.dtype),
                    lengths)

  def append(self, k_new, v_new) -> "MoAKVCache":
    """One token per sequence, k_new, v_new [B, Hkv, D], at lengths[b]."""
    want = (self.k.shape[1], self.k.shape[0], self.k.shape[3])
    if k_new.shape != want or v_new.shape != want:
      raise ValueError(f"k_new and v_new must be {want}, got {k_new.shape} "
                       f"and {v_new.shape}")
    lens = _concrete(self.lengths)
    if lens is not None and (lens >= self.max_len).any():
      raise ValueError(f"MoAKVCache is full: sequences "
                       f"{np.flatnonzero(lens >= self.max_len).tolist()} "
                       f"already hold max_len={self.max_len} tokens")
    return _append(self, k_new.astype(self.k.dtype), v_new.astype(self.k.dtype))

  def raise_if_overflowed(self) -> None:
    over = np.asarray(self.overflowed)
    if over.any():
      raise ValueError(f"appends past max_len={self.max_len} were dropped "
                       f"for sequences {np.flatnonzero(over).tolist()}")

  def decode_lists(self):
    """(pool view [Hkv, B * C / block, block, D] of k and v, VisitList)."""
    hkv, b, cap, d = self.k.shape
    block = self.block
    nblk = cap // block
    held = self.held_tokens()  # [B, Hkv]
    e = jnp.arange(nblk, dtype=jnp.int32)
    pages = jnp.broadcast_to(jnp.arange(b)[:, None, None] * nblk + e,
                             (b, hkv, nblk)).astype(jnp.int32)
    logical = jnp.broadcast_to(e, (b, hkv, nblk))
    lists = VisitList(pages, logical, (-(-held // block)).astype(jnp.int32),
                      held)
    view = lambda x: x.reshape(hkv, b * nblk, block, d)
    return view(self.k), view(self.v), lists


def _slots(pos, sinks, windows):
  """Ring slot of absolute positions pos [...] for every kv head: [..., H]."""
  s = jnp.asarray(sinks)
  w = jnp.maximum(jnp.asarray(windows), 1)
  p = pos[..., None]
  return jnp.where(p < s, p, s + jnp.mod(p - s, w))


@jax.jit
def _prefill(cache: MoAKVCache, k, v, lengths) -> MoAKVCache:
  b, l, hkv, _ = k.shape
  pos = jnp.arange(l)
  slot = _slots(pos, cache.sinks, cache.windows)  # [L, Hkv]
  s = jnp.asarray(cache.sinks)[None, None]
  w = jnp.asarray(cache.windows)[None, None]
  last = lengths[:, None, None] - 1
  p = pos[None, :, None]
  keep = (p <= last) & ((p < s) | (last - p < w))  # [B, L, Hkv]
  dest = jnp.where(keep, slot[None], cache.capacity)  # dropped if not kept
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(hkv)[None, None, :]

  def put(x):
    return jnp.zeros_like(cache.k).at[hi, bi, dest].set(x, mode="drop")

  return dataclasses.replace(cache, k=put(k), v=put(v), lengths=lengths,
                             overflowed=jnp.zeros_like(cache.overflowed))


@jax.jit
def _append(cache: MoAKVCache, k_new, v_new) -> MoAKVCache:
  pos = cache.lengths
  over = pos >= cache.max_len
  slot = jnp.where(over[:, None], cache.capacity,
                   _slots(pos, cache.sinks, cache.windows))  # [B, Hkv]
  bi = jnp.arange(pos.shape[0])[:, None]
  hi = jnp.arange(cache.k.shape[0])[None]
  put = lambda buf, x: buf.at[hi, bi, slot].set(x, mode="drop")
  return dataclasses.replace(
      cache, k=put(cache.k, k_new), v=put(cache.v, v_new),
      lengths=jnp.where(over, pos, pos + 1),
      overflowed=cache.overflowed | over)


def moa_decode(q, cache: MoAKVCache, *, scale: Optional[float] = None, impl: str = "auto",
               interpret: bool = False, tuning=None):
  """Decode attention of q [B, H, D] over each kv head's span."""
  k, v, lists = cache.decode_lists()
  return paged_decode_attention(q, k, v, lists, scale=scale, impl=impl,
                                interpret=interpret, tuning=tuning)


def moa_reference(q, k, v, lengths, sinks: Sequence[int],
                  windows: Sequence[int], *, scale: Optional[float] = None):
  """The definition for the token at lengths - 1 over k, v [B, N, Hkv, D];
  sinks / windows per kv head."""
  b, n, hkv, d = k.shape
  scale = d ** -0.5 if scale is None else scale
  g = q.shape[1] // hkv
  s = jnp.repeat(jnp.asarray(sinks), g)[None, :, None]
  w = jnp.repeat(jnp.asarray(windows), g)[None, :, None]
  last = (lengths - 1)[:, None, None]
  p = jnp.arange(n)[None, None]
  vis = (p <= last) & ((p < s) | (last - p < w))
  return selection.dense_attention(q, k, v, vis, scale)
