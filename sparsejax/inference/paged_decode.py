"""`paged_decode_attention`: one query token per sequence over a visit list.

Every decode path of this package (dense paged, Quest's selected pages,
Double Sparsity's and TidalDecode's selected tokens, MoA's per-head spans)
is this one op: q [B, H, D] attends, per (sequence, list head), the tokens
of the pages its `VisitList` names, in a pool k, v [Hkv, P, page, D]. Token
lists use the pool's token view (page 1). A list head owns H / Hg q heads,
Hg = Hkv for shared or per-kv-head lists (GQA: the group's q heads are the
rows of one tile) and Hg = H for per-q-head lists.

`return_scores=True` also returns, per list head, the logits of every list
slot reduced over the list head's q heads by max: scores[b, g, e * page + t]
is max over rows of scale * q . k for the token at logical[e] * page + t (-inf
where not attended). TidalDecode's selection layers and Double Sparsity's
label scores read these.

impl: "reference" (gathers everything, the definition), "xla" (the kernels'
twin: page blocks, online softmax in base 2, `block_math`), "pallas_triton"
(split-KV over the list, pallas_kernels/gpu/paged_decode.py), "pallas_tpu"
(scalar-prefetch page lists, pallas_kernels/tpu/paged_decode.py), "auto".
Decode is inference-only: there is no backward.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from sparsejax.block_sparse import block_math
from sparsejax.inference.implementations import DECODE
from sparsejax.inference.paged_cache import VisitList
from sparsejax.parallel import per_shard


def list_geometry(q, k_pages, lists: VisitList):
  """(Hg, rows, kv head of each list head) after validating the shapes."""
  if q.ndim != 3 or k_pages.ndim != 4:
    raise ValueError(f"q must be [B, H, D] and the pools [Hkv, P, page, D], "
                     f"got {q.shape} and {k_pages.shape}")
  b, h, d = q.shape
  hkv = k_pages.shape[0]
  if k_pages.shape[3] != d:
    raise ValueError(f"q's head_dim {d} != the pool's {k_pages.shape[3]}")
  if h % hkv:
    raise ValueError(f"q heads ({h}) must be a multiple of kv heads ({hkv})")
  hl = lists.pages.shape[1]
  if hl not in (1, hkv, h):
    raise ValueError(f"lists must have 1, kv_heads={hkv} or heads={h} list "
                     f"heads, got {hl}")
  want = (b, hl)
  for name in ("pages", "logical"):
    x = getattr(lists, name)
    if x.ndim != 3 or x.shape[:2] != want or x.shape != lists.pages.shape:
      raise ValueError(f"lists.{name} must be [{b}, {hl}, W], got {x.shape}")
  for name in ("counts", "limits"):
    if getattr(lists, name).shape != want:
      raise ValueError(f"lists.{name} must be {list(want)}, got "
                       f"{getattr(lists, name).shape}")
  hg = h if hl == h and h != hkv else hkv
  return hg, h // hg, jnp.arange(hg) // (hg // hkv)


def expand_lists(lists: VisitList, hg: int) -> VisitList:
  """Lists with exactly hg list heads (a shared list broadcast)."""
  if lists.pages.shape[1] == hg:
    return lists
  b, _, w = lists.pages.shape
  return VisitList(*(jnp.broadcast_to(x, (b, hg) + x.shape[2:])
                     for x in lists))


def _visible(lists: VisitList, page: int):
  """bool [B, Hg, W, page] and positions of every list slot."""
  w = lists.pages.shape[-1]
  pos = lists.logical[..., None] * page + jnp.arange(page)
  listed = jnp.arange(w) < lists.counts[..., None]
  return listed[..., None] & (pos < lists.limits[..., None, None])


def decode_reference(q, k_pages, v_pages, lists: VisitList, *, scale,
                     return_scores=False):
  """The definition: gather every listed page, masked softmax (f32+)."""
  b, h, d = q.shape
  hg, rows, kvh = list_geometry(q, k_pages, lists)
  lists = expand_lists(lists, hg)
  page = k_pages.shape[2]
  dt = jnp.promote_types(q.dtype, jnp.float32)
  k = k_pages[kvh[None, :, None], lists.pages].astype(dt)  # [B,Hg,W,page,D]
  v = v_pages[kvh[None, :, None], lists.pages].astype(dt)
  qg = q.reshape(b, hg, rows, d).astype(dt)
  s = jnp.einsum("bgrd,bgwtd->bgrwt", qg, k,
                 precision=jax.lax.Precision.HIGHEST) * scale
  vis = _visible(lists, page)[:, :, None]
  s = jnp.where(vis, s, -jnp.inf)
  m = s.max((-2, -1), keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  den = p.sum((-2, -1))
  o = jnp.einsum("bgrwt,bgwtd->bgrd", p, v,
                 precision=jax.lax.Precision.HIGHEST)
  out = jnp.where(den[..., None] > 0, o / jnp.where(den > 0, den, 1)[
      ..., None], 0.0).reshape(b, h, d).astype(q.dtype)
  if not return_scores:
    return out
  return out, s.max(2).reshape(b, hg, -1).astype(jnp.float32)


def decode_xla(q, k_pages, v_pages, lists: VisitList, *, scale,
               return_scores=False, block_pages: Optional[int] = None):
  """The kernels' twin: blocks of `block_pages` list entries, online
  softmax in base 2 through `block_math` (O(block) working memory)."""
  b, h, d = q.shape
  hg, rows, kvh = list_geometry(q, k_pages, lists)
  lists = expand_lists(lists, hg)
  page, w = k_pages.shape[2], lists.pages.shape[-1]
  ppb = block_pages or max(1, 128 // page)
  nblk = -(-w // ppb)
  pad = ((0, 0), (0, 0), (0, nblk * ppb - w))
  pages = jnp.pad(lists.pages, pad, mode="edge")
  logical = jnp.pad(lists.logical, pad, mode="edge")
  qg = q.reshape(b, hg, rows, d)

  def one_list(qr, kh, pg, lg, count, limit):  # one (b, list head)
    def step(carry, e):
      ids = jax.lax.dynamic_slice_in_dim(pg, e * ppb, ppb)
      lgs = jax.lax.dynamic_slice_in_dim(lg, e * ppb, ppb)
      kk = k_pages[kh, ids].reshape(ppb * page, d)
      vv = v_pages[kh, ids].reshape(ppb * page, d)
      s = block_math.scores(qr, kk, scale, None)
      entry = e * ppb + jnp.arange(ppb)
      pos = lgs[:, None] * page + jnp.arange(page)
      vis = ((entry < count)[:, None] & (pos < limit)).reshape(1, -1)
      vis = jnp.broadcast_to(vis, s.shape)
      sc = jnp.where(vis, s, -jnp.inf).max(0) * block_math.LN2
      return block_math.online_softmax_step(s, vv, *carry, vis), sc

    init = (jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, d), jnp.float32))
    carry, sc = jax.lax.scan(step, init, jnp.arange(nblk))
    out, _ = block_math.finalize(*carry, q.dtype)
    return out, sc.reshape(-1)[:w * page]

  f = jax.vmap(jax.vmap(one_list, in_axes=(0, 0, 0, 0, 0, 0)),
               in_axes=(0, None, 0, 0, 0, 0))
  out, sc = f(qg, kvh, pages, logical, lists.counts, lists.limits)
  out = out.reshape(b, h, d)
  return (out, sc) if return_scores else out


def paged_decode_attention(q, k_pages, v_pages, lists: VisitList, *,
                           scale: Optional[float] = None, impl: str = "auto",
                           interpret: bool = False, tuning=None,
                           return_scores: bool = False):
  """Decode attention of q [B, H, D] over the tokens `lists` names.

  Args:
    q: the new token's queries, [B, H, D].
    k_pages, v_pages: the pool, [Hkv, P, page, D] (or its token view).
    lists: a `VisitList` with 1, Hkv or H list heads.
    scale: logit scale, default head_dim ** -0.5.
    impl: "reference", "xla", "pallas_triton", "pallas_tpu" or "auto".
    interpret: run a Pallas implementation in interpret mode (CPU).
    tuning: the implementation's TuningConfig (Pallas kernels).
    return_scores: also return the group-max logits per list slot, f32
      [B, Hg, W * page] (see the module doc).

  Returns:
    out [B, H, D] in q.dtype (zeros for a sequence that attends nothing),
    and the scores when `return_scores`.
  """
  hg, _, _ = list_geometry(q, k_pages, lists)
  if k_pages.shape != v_pages.shape:
    raise ValueError(f"k_pages and v_pages must match, got {k_pages.shape} "
                     f"and {v_pages.shape}")
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  chosen = DECODE.resolve(
      impl, interpret=interpret,
      problem=(q.dtype, q.shape[-1], k_pages.shape[2], hg, q.shape[1] // hg,
               lists.pages.shape[-1], interpret))
  fn = chosen.load()
  kw = dict(scale=scale, return_scores=return_scores)
  if chosen.supports_interpret:  # the Pallas kernels
    kw.update(interpret=interpret, tuning=tuning)
    lists = expand_lists(lists, hg)
  # Per (batch, head) shard under a device mesh (sparsejax.parallel): the
  # pool splits over kv heads with its q heads; page ids index the whole
  # pool (its page axis is never split).
  return per_shard(functools.partial(fn, **kw), ("bh", "h", "h", "bh"),
                   ("bh", "bh") if return_scores else "bh",
                   "paged_decode_attention")(q, k_pages, v_pages, lists)
