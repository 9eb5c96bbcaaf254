"""MInference 1.0 prefill patterns, built on device as BlockMasks.

Three patterns (microsoft/MInference `minference_forward.py`), each a
`Pattern` that turns (q, k) into a kept-block array [B, H, nq, nk] under
`jit` (`blocks`: the definition, and the search's view) and into the same
blocks as per-row lists (`lists`: what `minference_mask` builds from, see
`block_lists.py`), always causal with the diagonal kept:

* `AShape(sink, local)`: the first `sink` tokens plus a local band of
  `local` tokens (StreamingLLM's "A" shape).
* `VerticalSlash(vertical, slash)`: estimated from the last `last_q` (64)
  queries against every key (causal among themselves): column sums score
  vertical lines and sums along each diagonal score slashes; the first
  `init` (30) columns and the last `local` (100) diagonals are forced in.
* `BlockSparse(topk)`: mean-pooled q and k blocks, causal pooled q.k, the
  top-k kv blocks of each q block.

Granularity: MInference's vertical-slash kernel computes the chosen columns
exactly, gathering K/V rows 64 at a time per q block (a per-query gathered
column list). The block-sparse core has no such list and its mask functions
cannot read data, so here the token-level scores are pooled to the core's
blocks: column scores into kv blocks, diagonal scores into block diagonals
(a diagonal at offset o = ob * block + t falls (block - t) / block into
block diagonal ob and t / block into ob + 1), and the top
ceil(vertical / block) kv blocks and ceil(slash / block) block diagonals are
kept. The forced columns and diagonals force the blocks that hold them. This
computes whole blocks where MInference computes lines (more work for the
same budget, at least its recall), and runs on every kernel of the core.

`search_patterns` is the offline per-head search (MInference v1's
`search_pattern`): on calibration q/k it measures, per head and candidate,
the fraction of the dense attention mass the candidate's blocks keep, and
picks the cheapest candidate above `min_recall`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.block_sparse import masks as masks_lib
from sparsejax.learned import block_lists
from sparsejax.learned.gate import block_causal, index_mask, pool_blocks
from sparsejax.learned.gate import top_k_mask


def _blocks(tokens: int, block: int) -> int:
  return max(1, -(-int(tokens) // block))


def _repeat_kv(k, heads):
  return jnp.repeat(k, heads // k.shape[2], axis=2)



def _finish(blocks):
  """AND causal, OR the diagonal."""
  nq, nk = blocks.shape[-2:]
  eye = jnp.arange(nq)[:, None] == jnp.arange(nk)[None, :]
  return (blocks | eye) & block_causal(nq, nk)


@dataclasses.dataclass(frozen=True)
class AShape:
  """Sink + local band (MInference's search default: 100 + 800 tokens)."""
  sink: int = 128
  local: int = 1024

  def _keep(self, n: int, block: int) -> np.ndarray:
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    return (j < _blocks(self.sink, block)) | (i - j < _blocks(self.local,
                                                              block))

  def blocks(self, q, k, block: int):
    del k
    b, lq, h, _ = q.shape
    n = -(-lq // block)
    return jnp.broadcast_to(_finish(jnp.asarray(self._keep(n, block))),
                            (b, h, n, n))

  def lists(self, q, k, block: int):
    """Static: the same lists for every input."""
    del k
    return block_lists.static_below_diagonal(
        self._keep(-(-q.shape[1] // block), block))


def vertical_slash_scores(q, k, *, last_q: int = 64,
                          scale: Optional[float] = None):
  """(vertical [B, H, Lk], slash [B, H, Lk]) from the last `last_q` queries.

  softmax of the last queries against all keys (causal among them: query
  at position p sees keys <= p); vertical[j] is column j's sum, slash[o] the
  sum along the diagonal q_pos - kv_pos = o.
  """
  _, lq, h, d = q.shape
  lk = k.shape[1]
  if lq != lk:
    raise ValueError(f"vertical-slash estimation is for self-attention "
                     f"prefill: q_len ({lq}) must equal kv_len ({lk})")
  last_q = min(last_q, lq)
  scale = d ** -0.5 if scale is None else scale
  pos = lq - last_q + jnp.arange(last_q)  # query positions
  b, hkv = q.shape[0], k.shape[2]
  # GQA as a grouped einsum (head h reads kv head h // group): no repeated
  # copy of k; f32 accumulation of the inputs' dtype.
  qg = q[:, -last_q:].reshape(b, last_q, hkv, h // hkv, d)
  s = jnp.einsum("bqngd,bknd->bngqk", qg, k.astype(q.dtype),
                 preferred_element_type=jnp.float32)
  s = s.reshape(b, h, last_q, lk) * scale
  s = jnp.where(jnp.arange(lk)[None, :] <= pos[:, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)  # [B, H, last_q, Lk]
  vertical = p.sum(2)
  # Diagonal sums by shearing: query row i (position lk - last_q + i) at
  # offset o reads key lk - last_q + i - o, i.e. its reversed row at
  # o + last_q - 1 - i (zero past the row's start). Static slices, summed
  # in one fusion (no [.., last_q, Lk] gather).
  rev = jnp.pad(jnp.flip(p, -1), ((0, 0), (0, 0), (0, 0), (0, last_q)))
  slash = sum(rev[:, :, i, last_q - 1 - i:last_q - 1 - i + lk]
              for i in range(last_q))
  return vertical, slash


@dataclasses.dataclass(frozen=True)
class VerticalSlash:
  """Top vertical lines and slashes from the last queries, in blocks.

  vertical / slash are MInference's budgets in tokens (its most common
  setting: 1000 / 6096); init / local the forced first columns and last
  diagonals (30 / 100).
  """
  vertical: int = 1000
  slash: int = 6096
  last_q: int = 64
  init: int = 30
  local: int = 100

  def picks(self, q, k, block: int):
    """(vertical kv blocks [B, H, nv], slash block offsets [B, H, ns])."""
    lk = k.shape[1]
    nk = -(-lk // block)
    vert, slash = vertical_slash_scores(q, k, last_q=self.last_q)
    pad = nk * block - lk
    vert = jnp.pad(vert, ((0, 0), (0, 0), (0, pad)))
    vblock = vert.reshape(*vert.shape[:2], nk, block).sum(-1)
    o = jnp.arange(lk)
    ob, t = o // block, (o % block).astype(jnp.float32)
    sblock = jnp.zeros(slash.shape[:2] + (nk + 1,), jnp.float32)
    sblock = sblock.at[..., ob].add(slash * (block - t) / block)
    sblock = sblock.at[..., ob + 1].add(slash * t / block)[..., :nk]
    # Forced lines force their blocks (+inf wins every top-k).
    vforced = np.arange(nk) <= (min(self.init, lk) - 1) // block
    sforced = np.arange(nk) <= -(-(min(self.local, lk) - 1) // block)
    nv = max(_blocks(self.vertical, block), int(vforced.sum()))
    ns = max(_blocks(self.slash, block), int(sforced.sum()))
    _, vidx = jax.lax.top_k(jnp.where(vforced, jnp.inf, vblock), min(nv, nk))
    _, sidx = jax.lax.top_k(jnp.where(sforced, jnp.inf, sblock), min(ns, nk))
    return vidx, sidx

  def blocks(self, q, k, block: int):
    nq, nk = -(-q.shape[1] // block), -(-k.shape[1] // block)
    vidx, sidx = self.picks(q, k, block)
    vkeep = index_mask(vidx, nk)
    skeep = index_mask(sidx, nk)
    diag = jnp.clip(jnp.arange(nq)[:, None] - jnp.arange(nk)[None, :], 0,
                    nk - 1)  # block offset of (qb, kb)
    keep = vkeep[:, :, None, :] | skeep[:, :, diag]
    return _finish(keep)

  def lists(self, q, k, block: int):
    """Row i: the picked columns v < i and the blocks i - o of the picked
    offsets o >= 1 (merged, sorted): width nv + ns, not nk."""
    nq = -(-q.shape[1] // block)
    vidx, sidx = self.picks(q, k, block)
    b, h = vidx.shape[:2]
    rows = jnp.arange(nq, dtype=jnp.int32)[:, None]
    cand = jnp.concatenate([
        jnp.broadcast_to(vidx[:, :, None, :], (b, h, nq, vidx.shape[-1])),
        rows - sidx[:, :, None, :]], axis=-1)
    return block_lists.below_diagonal(cand)


@dataclasses.dataclass(frozen=True)
class BlockSparse:
  """Top-k kv blocks per q block by mean-pooled q.k (MInference: 100)."""
  topk: int = 100

  def _scores(self, q, k, block: int):
    h, d = q.shape[2], q.shape[3]
    qp = pool_blocks(q, block, ("avg",))
    kp = _repeat_kv(pool_blocks(k, block, ("avg",)), h)
    s = jnp.einsum("bihd,bjhd->bhij", qp, kp) * d ** -0.5
    nq, nk = s.shape[2:]
    return jnp.where(block_causal(nq, nk), s, -jnp.inf)

  def blocks(self, q, k, block: int):
    return _finish(top_k_mask(self._scores(q, k, block), self.topk))

  def lists(self, q, k, block: int):
    s = self._scores(q, k, block)
    _, idx = jax.lax.top_k(s, min(self.topk, s.shape[-1]))
    return block_lists.below_diagonal(idx, unique=True)


@dataclasses.dataclass(frozen=True)
class Dense:
  """Every causal block (a head the search keeps dense)."""

  def blocks(self, q, k, block: int):
    b, lq, h, _ = q.shape
    nq, nk = -(-lq // block), -(-k.shape[1] // block)
    return jnp.broadcast_to(block_causal(nq, nk), (b, h, nq, nk))

  def lists(self, q, k, block: int):
    del k
    n = -(-q.shape[1] // block)
    return block_lists.static_below_diagonal(np.ones((n, n), bool))


Pattern = Union[AShape, VerticalSlash, BlockSparse, Dense]

# Spec strings "kind:arg:arg" <-> patterns, for configs and search results.
PATTERNS: Dict[str, type] = {"a_shape": AShape,
                             "vertical_slash": VerticalSlash,
                             "block_sparse": BlockSparse, "dense": Dense}


def parse_pattern(spec: Union[str, Pattern]) -> Pattern:
  """'vertical_slash:1000:6096' -> VerticalSlash(1000, 6096), etc."""
  if not isinstance(spec, str):
    return spec
  kind, *args = spec.split(":")
  if kind not in PATTERNS:
    raise ValueError(f"unknown MInference pattern {kind!r}; valid: "
                     f"{sorted(PATTERNS)}")
  return PATTERNS[kind](*(int(a) for a in args))


def pattern_spec(pattern: Pattern) -> str:
  name = {v: k for k, v in PATTERNS.items()}[type(pattern)]
  return ":".join([name] + [str(getattr(pattern, f.name)) for f in
                            dataclasses.fields(pattern)])


def head_blocks(q, k, patterns: Union[Pattern, Sequence[Pattern]], *,
                block_size: int = 64):
  """Kept blocks bool [B, H, nq, nk]: head h uses patterns[h] (or one
  pattern for all heads). Heads sharing a pattern are estimated together."""
  h = q.shape[2]
  patterns = _parse_heads(patterns, h)
  kr = _repeat_kv(k, h)
  parts, order = [], []
  if len(set(patterns)) == 1:  # one pattern: no per-head gathers
    return patterns[0].blocks(q, kr, block_size)
  for pattern in dict.fromkeys(patterns):  # distinct, in first-use order
    heads = [i for i, p in enumerate(patterns) if p == pattern]
    sel = np.asarray(heads)
    parts.append(pattern.blocks(q[:, :, sel], kr[:, :, sel], block_size))
    order.extend(heads)
  blocks = jnp.concatenate(parts, axis=1)
  return blocks[:, np.argsort(order)]


def _parse_heads(patterns, h):
  if not isinstance(patterns, (list, tuple)):
    patterns = [patterns] * h
  patterns = [parse_pattern(p) for p in patterns]
  if len(patterns) != h:
    raise ValueError(f"patterns has {len(patterns)} entries, q has {h} "
                     f"heads")
  return patterns


def head_lists(q, k, patterns: Union[Pattern, Sequence[Pattern]], *,
               block_size: int = 64):
  """`head_blocks` as lists: (counts [B, H, nq], idx [B, H, nq, W]) of
  each head's kept blocks below the diagonal (`block_lists`), built from
  the patterns' picks without [nq, nk] arrays."""
  b, _, h, _ = q.shape
  patterns = _parse_heads(patterns, h)
  full = lambda x, hh: jnp.broadcast_to(x, (b, hh) + x.shape[2:])
  if len(set(patterns)) == 1:  # one pattern: k stays un-repeated (GQA)
    counts, idx = patterns[0].lists(q, k, block_size)
    return full(counts, h), full(idx, h)
  kr = _repeat_kv(k, h)
  parts, order = [], []
  for pattern in dict.fromkeys(patterns):  # distinct, in first-use order
    heads = [i for i, p in enumerate(patterns) if p == pattern]
    sel = np.asarray(heads)
    counts, idx = pattern.lists(q[:, :, sel], kr[:, :, sel], block_size)
    parts.append((full(counts, len(heads)), full(idx, len(heads))))
    order.extend(heads)
  width = max(idx.shape[-1] for _, idx in parts)
  # Edge padding repeats each row's last entry: its last listed block.
  idx = jnp.concatenate([jnp.pad(i, ((0, 0),) * 3 + ((0, width -
                                                       i.shape[-1]),),
                                 mode="edge") for _, i in parts], axis=1)
  counts = jnp.concatenate([c for c, _ in parts], axis=1)
  inv = np.argsort(order)
  return counts[:, inv], idx[:, inv]


def minference_mask(q, k, patterns, *, block_size: int = 64,
                    width: Optional[int] = None):
  """A causal `BlockMask` of the per-head patterns (traced under jit).

  Built from `head_lists` (`block_lists.causal_mask_from_lists`): the same
  element mask as `from_block_mask(head_blocks(...), mask_fn=Causal())`,
  without its per-element work. width pads the lists (equal shapes share
  compiled kernels).
  """
  masks_lib._check_block_size(block_size)  # pylint: disable=protected-access
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"MInference masks are for self-attention prefill: "
                     f"q_len ({q.shape[1]}) must equal kv_len "
                     f"({k.shape[1]})")
  counts, idx = head_lists(q, k, patterns, block_size=block_size)
  return block_lists.causal_mask_from_lists(
      counts, idx, block_size=block_size, q_len=q.shape[1], width=width)


# --- offline per-head search -------------------------------------------------

DEFAULT_CANDIDATES: Tuple[Pattern, ...] = (
    # MInference v1's candidate list (vertical, slash budgets in tokens),
    # its A-shape (100 + 800), and a block-sparse one; see dynamic_sparse.md.
    AShape(100, 800), VerticalSlash(30, 800), VerticalSlash(100, 750),
    VerticalSlash(500, 700), VerticalSlash(3500, 100),
    VerticalSlash(1000, 6096), BlockSparse(8))


def block_attention_mass(q, k, *, block_size: int = 64,
                         scale: Optional[float] = None):
  """Causal attention mass per block, [B, H, nq, nk] (rows sum to 1 per
  query, so a block row sums to its number of rows). Dense per head: for
  calibration lengths."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  scale = d ** -0.5 if scale is None else scale
  kr = _repeat_kv(k, h).astype(jnp.float32)
  nq, nk = -(-lq // block_size), -(-lk // block_size)
  vis = jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None]

  def one_head(hh):
    s = jnp.einsum("bqd,bkd->bqk", q[:, :, hh].astype(jnp.float32),
                   kr[:, :, hh]) * scale
    p = jax.nn.softmax(jnp.where(vis, s, -jnp.inf), axis=-1)
    p = jnp.pad(p, ((0, 0), (0, nq * block_size - lq),
                    (0, nk * block_size - lk)))
    return p.reshape(b, nq, block_size, nk, block_size).sum((2, 4))

  return jnp.moveaxis(jax.lax.map(one_head, jnp.arange(h)), 0, 1)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _search_stats(q, k, candidates, block_size, skip_rows):
  """(recall, density) [H, n_candidates] of every candidate, in one jit."""
  mass = block_attention_mass(q, k, block_size=block_size)
  nq = mass.shape[2]
  rows = (jnp.arange(nq) * block_size >= skip_rows)[:, None]
  mass = jnp.where(rows, mass, 0.0)
  total = mass.sum((0, 2, 3))
  causal = block_causal(nq, mass.shape[3]).sum()
  recall, density = [], []
  for cand in candidates:
    blocks = cand.blocks(q, k, block_size)
    recall.append(jnp.where(blocks, mass, 0.0).sum((0, 2, 3)) / total)
    density.append(blocks.sum((0, 2, 3)) / (causal * blocks.shape[0]))
  return jnp.stack(recall, 1), jnp.stack(density, 1)


def search_patterns(q, k, candidates: Sequence[Pattern] = DEFAULT_CANDIDATES,
                    *, block_size: int = 64, min_recall: float = 0.95,
                    skip_rows: int = 0):
  """Per head, the cheapest candidate keeping >= min_recall of the mass.

  Args:
    q: calibration queries [B, L, H, D] (one layer, after RoPE); k: keys.
    candidates: patterns to try.
    block_size: the core's block (64, as MInference).
    min_recall: attention mass a pattern must keep (rows >= skip_rows).
    skip_rows: ignore the first query rows (MInference v1: 2500).

  Returns:
    dict(patterns=[spec per head], recall [H, n_candidates],
    density [H, n_candidates]) (numpy): the spec strings are what the
    `minference` layer's `head_patterns` option takes.
  """
  recall, density = _search_stats(q, k, tuple(candidates), block_size,
                                  skip_rows)
  recall, density = np.asarray(recall), np.asarray(density)
  chosen = []
  for hh in range(recall.shape[0]):
    ok = np.flatnonzero(recall[hh] >= min_recall)
    pick = (ok[np.argmin(density[hh, ok])] if ok.size else
            int(np.argmax(recall[hh])))
    chosen.append(pattern_spec(candidates[pick]))
  return dict(patterns=chosen, recall=recall, density=density)


def causal_density(blocks) -> float:
  """Kept fraction of the causal block pairs over the whole array."""
  nq, nk = blocks.shape[-2:]
  return float(blocks.sum() / (block_causal(nq, nk).sum() *
                               math.prod(blocks.shape[:-2])))
