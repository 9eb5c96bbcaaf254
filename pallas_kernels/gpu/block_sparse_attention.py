"""Block-sparse flash attention for GPU: Pallas with the Triton lowering.

Forward and dQ programs own one (q block, head, batch) and walk that row's
full then partial kv-block lists; dK/dV programs own one (kv block, q head,
batch) and walk the transposed lists. Lists are ordinary inputs read inside
the kernel (the GPU backends have no scalar prefetch) and trip counts come
from the counts. Full blocks skip all element-mask work. GQA: dK/dV are
computed per q head and summed per kv head outside the kernel.

Score mods see index vectors (q_idx [bq, 1], kv_idx [1, bk]); additive
ScoreMods give their bias through `tile_bias` (score_mods), already scaled
into the base-2 logits and, in dQ, with -lse folded into their per-row
term (Alibi: one multiply-add per element on tiles off the diagonal).
Parameter statistics: dQ programs accumulate g * w per element for mods
with `stat_weights` (one reduction per program), else sum each tile's
`tile_stats`. Mods that gather from a table get one forward pipeline
stage less (the gather's layout conversion needs that shared memory).

`attention` (bottom) is the custom_vjp entry used by sparsejax.attention;
`sparsejax.reference.attention_reference` is the definition it must match.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from sparsejax.block_sparse import block_math
from sparsejax.block_sparse import score_mods
from sparsejax.block_sparse.block_mask import next_power_of_2
from sparsejax.block_sparse.vjp import make_vjp, walked_lists



@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Warps, stages and sub-tiles; the list blocks come from the BlockMask.

  A mask block can be walked in smaller sub-tiles: the forward splits each kv
  block into `sub_kv_fwd` columns, dQ each kv block into `sub_kv_dq` columns
  and dK/dV each q block into `sub_q_dkv` rows (as Triton's fused attention
  tutorial does), which keeps register pressure down at head_dim 128.
  None means the whole block (capped at 32 for the backward sub-tiles).
  """
  # Defaults from a sweep on the H200 (S2 32K, head_dim 128; see
  # benchmarks/attention/NOTES.md). None: derived from head_dim.
  num_warps_fwd: Optional[int] = None  # 4 for head_dim <= 64, else 8
  num_stages_fwd: Optional[int] = None  # 3 (2 with a gathering mod), 1 at
  #                                       head_dim 256 (shared memory)
  num_warps_bwd: Optional[int] = None
  num_stages_bwd: int = 2
  sub_kv_fwd: Optional[int] = None
  sub_kv_dq: Optional[int] = None
  sub_q_dkv: Optional[int] = None

  def sub(self, name: str, block: int) -> int:
    v = getattr(self, name)
    if v is None:
      v = block if name == "sub_kv_fwd" else min(block, 32)
    if v < 16 or v & (v - 1) or block % v:
      raise ValueError(f"{name} must be a power of two >= 16 dividing the "
                       f"block ({block}), got {v}")
    return v

  def __post_init__(self):
    for name in ("num_warps_fwd", "num_warps_bwd"):
      w = getattr(self, name)
      if w is not None and (w < 1 or w & (w - 1) or w > 16):
        raise ValueError(f"{name} must be a power of two in [1, 16], got {w}")
    for name in ("num_stages_fwd", "num_stages_bwd"):
      if getattr(self, name) is not None and not 1 <= getattr(self, name) <= 8:
        raise ValueError(f"{name} must be in [1, 8], got "
                         f"{getattr(self, name)}")

  def stages_fwd(self, head_dim: int, gathers: bool = False) -> int:
    """gathers: the score mod looks up a table per element (its layout
    conversion needs the shared memory of one stage)."""
    if self.num_stages_fwd is not None:
      return self.num_stages_fwd
    return (2 if gathers else 3) if head_dim <= 128 else 1

  def warps(self, which: str, head_dim: int) -> int:
    w = getattr(self, f"num_warps_{which}")
    return w if w is not None else (4 if head_dim <= 64 else 8)


def validate_blocks(block_q: int, block_kv: int, head_dim: int) -> None:
  for name, b in (("block_q", block_q), ("block_kv", block_kv)):
    if b < 16 or b > 256 or b & (b - 1):
      raise ValueError(f"pallas_triton needs {name} a power of two in "
                       f"[16, 256], got {b}")
    # Measured on the H200: head_dim 256 with 128-wide tiles asks for ~300 KB
    # of shared memory (the SM has 227 KB).
    if head_dim > 128 and b > 64:
      raise ValueError(f"pallas_triton at head_dim {head_dim} needs {name} <= "
                       f"64 (shared memory); build the mask with "
                       f"block_size=64, got {b}")
  if head_dim & (head_dim - 1):
    raise ValueError(f"head_dim must be padded to a power of two, got "
                     f"{head_dim}")


def _walk(cnt_ref, idx_ref, block, sub, body, carry):
  """Runs body(start, carry) over every `sub`-sized tile of the listed blocks.

  One flat loop over (list entry, sub-tile) pairs, so Triton can pipeline the
  tile loads across entries (num_stages) instead of seeing unrolled code.
  """
  nsub = block // sub

  def step(t, c):
    # nsub is a power of two; shifts avoid floor-division sign fix-ups that
    # the Triton lowering rejects.
    shift = nsub.bit_length() - 1
    entry, part = jnp.right_shift(t, shift), jnp.bitwise_and(t, nsub - 1)
    return body(pl.multiple_of(idx_ref[entry] * block + part * sub, sub), c)

  return jax.lax.fori_loop(0, cnt_ref[...] * nsub, step, carry)


def _program_ids(nq_rev: Optional[int]):
  i, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  if nq_rev is not None:  # heaviest (last) q blocks first: better tail balance
    i = nq_rev - 1 - i
  return b, h, i


# --- operands ----------------------------------------------------------------
#
# Every pallas_call takes (walked lists, tensors, segment ids, mod params) in
# an order given by a tuple of names; kernels get the refs back as a dict.


def _list_names(cfg, suffix=""):
  return [f"{name}_{part}{suffix}" for name, _, _ in walked_lists(cfg)
          for part in ("counts", "idx")]


def _list_specs(lists, names, index):
  """BlockSpecs of the count / index-list operands `names`."""
  specs = []
  for n in names:
    if "_counts" in n:
      specs.append(pl.BlockSpec((None, None, None), index))
    else:
      specs.append(pl.BlockSpec((None, None, None, lists[n].shape[-1]),
                                lambda *g: index(*g) + (0,)))
  return specs


def _param_specs(params):
  """Mod params as whole-array operands (tables are gathered from refs)."""
  return [pl.BlockSpec(p.shape, lambda *g, n=p.ndim: (0,) * n)
          for p in params]


def _param_names(params):
  return [f"param{j}" for j in range(len(params))]


def _mod(cfg, refs):
  n = 0 if cfg.score_mod is None else cfg.score_mod.num_leaves
  return score_mods.rebuild(cfg.score_mod,
                            [refs[f"param{j}"] for j in range(n)])


def _tile(cfg, mod, refs, b, h, q_start, kv_start, bq, bk, use_fn, use_ids,
          q_seg=None, kv_seg=None):
  """(element mask or None, mod coordinates or None) of one tile.

  A mod sees index vectors (q_idx [bq, 1], kv_idx [1, bk]), so it converts
  and scales per row and column, not per element.
  """
  ids = (q_seg, kv_seg) if use_ids else None
  vis = block_math.element_mask(cfg.mask_fn if use_fn else None, b, h,
                                q_start, kv_start, bq, bk, cfg.kv_len,
                                cfg.kv_len % cfg.block_kv != 0, ids)
  at = (None if mod is None else
        (b, h, *score_mods.tile_coords(q_start, kv_start, bq, bk)))
  return vis, at


def _bias(cfg, mod, b, h, q_start, kv_start, bq, bk, lse=None):
  """(bias, whether it holds -lse): an additive ScoreMod's bias in the
  scaled (base-2) logits from the tile's corner (`tile_bias`, see
  score_mods), or (None, False). dQ passes its rows' lse: without soft-cap
  the mod adds -lse to its per-row term, one subtraction per element fewer
  (not in dK/dV: there it costs spills, measured with triton_resources.py,
  for the same instruction count). Called after the q.k product so the
  bias tile is not live across the MMA."""
  if not (getattr(mod, "additive", False) and hasattr(mod, "tile_bias")):
    return None, False
  row = (None if lse is None or cfg.soft_cap is not None else
         block_math.neg_lse2(lse))
  return mod.tile_bias(block_math.bias_factor(cfg.soft_cap), b, h, q_start,
                       kv_start, bq, bk, row), row is not None


# Each weighted statistic holds a [block_q, sub_kv_dq] f32 tile in registers.
_MAX_WEIGHTED_STATS = 2


def _tile_weights(mod):
  """The mod's `tile_weights` where it defines `stat_weights` (ScoreMod
  protocol) for few statistics, or None: the dQ kernel then accumulates
  g * w per element instead of reducing every tile."""
  own = getattr(type(mod), "stat_weights", None)
  if (own is None or own is getattr(score_mods.ScoreMod, "stat_weights", None)
      or not hasattr(mod, "tile_weights")):
    return None
  if not 0 < mod.num_stats <= _MAX_WEIGHTED_STATS:
    return None
  return mod.tile_weights


def _gathers(cfg, params) -> bool:
  """Whether the mod looks up a table with a tile of indices (a gather).

  The gathered [bq, bk] tile is loaded in a blocked layout and converted to
  the MMA layout through shared memory, which the 3-stage forward pipeline
  at head_dim 128 has no room for (measured: 256 KB asked, 227 KB there).
  """
  if cfg.score_mod is None:
    return False
  bq, bk = 16, 16

  def bias(*p):
    mod = score_mods.rebuild(cfg.score_mod, p)
    return mod(jnp.zeros((bq, bk), jnp.float32), 0, 0,
               *score_mods.tile_coords(0, 0, bq, bk))

  specs = [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params]
  return _has_gather(jax.make_jaxpr(bias)(*specs).jaxpr)


def _has_gather(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if "gather" in eqn.primitive.name:
      return True
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns") and _has_gather(inner):
          return True
  return False


# --- forward ----------------------------------------------------------------


def _fwd_kernel(*refs, names, cfg, nq, sk):
  r = dict(zip(names, refs))
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, i = _program_ids(nq)
  mod = _mod(cfg, r)
  q = r["q"][...]
  q_seg = r["q_seg"][...] if cfg.segments else None
  carry = (jnp.full((bq,), -jnp.inf, jnp.float32),
           jnp.zeros((bq,), jnp.float32),
           jnp.zeros((bq, r["v"].shape[-1]), jnp.float32))
  for name, use_fn, use_ids in walked_lists(cfg):

    def body(start, c, use_fn=use_fn, use_ids=use_ids):
      kv_seg = r["kv_seg"][pl.ds(start, sk)] if use_ids else None
      vis, at = _tile(cfg, mod, r, b, h, i * bq, start, bq, sk, use_fn,
                      use_ids, q_seg, kv_seg)
      s_raw = block_math.raw_scores(q, r["k"][pl.ds(start, sk), :])
      bias, _ = _bias(cfg, mod, b, h, i * bq, start, bq, sk)
      s = block_math.logits(s_raw, cfg.scale, cfg.soft_cap, mod, at, bias)[0]
      return block_math.online_softmax_step(s, r["v"][pl.ds(start, sk), :],
                                            *c, vis)

    carry = _walk(r[f"{name}_counts"], r[f"{name}_idx"], bk, sk, body, carry)
  out, lse = block_math.finalize(*carry, r["o"].dtype)
  r["o"][...] = out
  r["lse"][...] = lse


def _seg_specs(cfg, row_block, row_index, all_len, all_index):
  """(q or kv) ids of the program's own block, and the walked side's row."""
  if not cfg.segments:
    return []
  return [pl.BlockSpec((None, row_block), row_index),
          pl.BlockSpec((None, all_len), all_index)]


def forward(q, k, v, lists, params, cfg):
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  group = h // hkv
  bq = cfg.block_q
  nq = lq // bq
  validate_blocks(bq, cfg.block_kv, d)
  tuning = cfg.tuning or TuningConfig()
  row = lambda i, hh, bb: (bb, hh, nq - 1 - i)
  lnames = _list_names(cfg)
  segs = ["q_seg", "kv_seg"] if cfg.segments else []
  names = (*lnames, "q", "k", "v", *segs, *_param_names(params), "o", "lse")
  in_specs = _list_specs(lists, lnames, row) + [
      pl.BlockSpec((None, bq, None, d), lambda i, hh, bb: (bb, nq - 1 - i, hh,
                                                           0)),
      pl.BlockSpec((None, lk, None, d), lambda i, hh, bb: (bb, 0, hh // group,
                                                           0)),
      pl.BlockSpec((None, lk, None, d), lambda i, hh, bb: (bb, 0, hh // group,
                                                           0)),
  ] + _seg_specs(cfg, bq, lambda i, hh, bb: (bb, nq - 1 - i), lk,
                 lambda i, hh, bb: (bb, 0)) + _param_specs(params)
  out_specs = [
      pl.BlockSpec((None, bq, None, d), lambda i, hh, bb: (bb, nq - 1 - i, hh,
                                                           0)),
      pl.BlockSpec((None, None, bq), row),
  ]
  seg_args = ([lists["q_segments"], lists["kv_segments"]] if cfg.segments
              else [])
  return pl.pallas_call(
      functools.partial(_fwd_kernel, names=names, cfg=cfg, nq=nq,
                        sk=tuning.sub("sub_kv_fwd", cfg.block_kv)),
      grid=(nq, h, b),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq), jnp.float32)],
      compiler_params=pltriton.CompilerParams(
          num_warps=tuning.warps("fwd", d),
          num_stages=tuning.stages_fwd(d, _gathers(cfg, params))),
      interpret=cfg.interpret,
      name="sparsejax_block_sparse_fwd",
  )(*[lists[n] for n in lnames], q, k, v, *seg_args, *params)


# --- backward: dQ (and the score mod's statistics) over row lists ------------


def _dq_kernel(*refs, names, cfg, nq, sk, width):
  r = dict(zip(names, refs))
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, i = _program_ids(nq)
  mod = _mod(cfg, r)
  q, do = r["q"][...], r["do"][...]
  lse, delta = r["lse"][...], r["delta"][...]
  q_seg = r["q_seg"][...] if cfg.segments else None
  # The statistics carry exists only with a mod (no zero-size arrays): one
  # [bq, sk] tile per weighted statistic (g * w accumulated per element,
  # reduced once at the end), else the [width] vector of tile_stats.
  weights = _tile_weights(mod) if width else None
  stats0 = (() if not width else
            (jnp.zeros((width,), jnp.float32),) if weights is None else
            tuple(jnp.zeros((bq, sk), jnp.float32)
                  for _ in range(mod.num_stats)))
  carry = (jnp.zeros(q.shape, jnp.float32),) + stats0
  prec = block_math.dot_precision(q.dtype)
  for name, use_fn, use_ids in walked_lists(cfg):

    def body(start, c, use_fn=use_fn, use_ids=use_ids):
      k = r["k"][pl.ds(start, sk), :]
      kv_seg = r["kv_seg"][pl.ds(start, sk)] if use_ids else None
      vis, at = _tile(cfg, mod, r, b, h, i * bq, start, bq, sk, use_fn,
                      use_ids, q_seg, kv_seg)
      s_raw = block_math.raw_scores(q, k)
      bias, has_lse = _bias(cfg, mod, b, h, i * bq, start, bq, sk, lse)
      _, g, ds = block_math.grads_from_raw(
          s_raw, r["v"][pl.ds(start, sk), :], do, lse, delta, cfg.scale,
          cfg.soft_cap, vis, mod, at, bias, has_lse)
      dq = c[0] + jax.lax.dot(ds.astype(k.dtype), k, precision=prec,
                              preferred_element_type=jnp.float32)
      if not width:
        return (dq,)
      if weights is not None:
        ws = weights(s_raw * cfg.scale, b, h, i * bq, start, bq, sk)
        return (dq,) + tuple(a + g * w for a, w in zip(c[1:], ws))
      return dq, c[1] + mod.tile_stats(g, s_raw * cfg.scale, *at, width)

    carry = _walk(r[f"{name}_counts"], r[f"{name}_idx"], bk, sk, body, carry)
  r["dq"][...] = carry[0].astype(r["dq"].dtype)
  if weights is not None:
    r["stats"][...] = sum(score_mods.bucket(width, j, jnp.sum(a))
                          for j, a in enumerate(carry[1:]))
  elif width:
    r["stats"][...] = carry[1]


# --- backward: dK/dV over column lists --------------------------------------


def _dkv_kernel(*refs, names, cfg, sq):
  r = dict(zip(names, refs))
  bq, bk = cfg.block_q, cfg.block_kv
  b, h, j = _program_ids(None)
  mod = _mod(cfg, r)
  k, v = r["k"][...], r["v"][...]
  kv_seg = r["kv_seg"][...] if cfg.segments else None
  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  prec = block_math.dot_precision(k.dtype)
  for name, use_fn, use_ids in walked_lists(cfg):

    def body(qs, c, use_fn=use_fn, use_ids=use_ids):
      q = r["q"][pl.ds(qs, sq), :]
      do = r["do"][pl.ds(qs, sq), :]
      q_seg = r["q_seg"][pl.ds(qs, sq)] if use_ids else None
      vis, at = _tile(cfg, mod, r, b, h, qs, j * bk, sq, bk, use_fn, use_ids,
                      q_seg, kv_seg)
      lse, delta = r["lse"][pl.ds(qs, sq)], r["delta"][pl.ds(qs, sq)]
      s_raw = block_math.raw_scores(q, k)
      bias, _ = _bias(cfg, mod, b, h, qs, j * bk, sq, bk)
      p, _, ds = block_math.grads_from_raw(s_raw, v, do, lse, delta, cfg.scale,
                                           cfg.soft_cap, vis, mod, at, bias)
      dk = c[0] + jax.lax.dot_general(
          ds.astype(q.dtype), q, (((0,), (0,)), ((), ())), precision=prec,
          preferred_element_type=jnp.float32)
      dv = c[1] + jax.lax.dot_general(
          p.astype(do.dtype), do, (((0,), (0,)), ((), ())), precision=prec,
          preferred_element_type=jnp.float32)
      return dk, dv

    carry = _walk(r[f"{name}_counts_t"], r[f"{name}_idx_t"], bq, sq, body,
                  carry)
  r["dk"][...] = carry[0].astype(r["dk"].dtype)
  r["dv"][...] = carry[1].astype(r["dv"].dtype)


def _param_grads(cfg, params, stats):
  """Cotangents of the mod's params from the dQ programs' stats rows."""
  mod = score_mods.rebuild(cfg.score_mod, params)
  stats = score_mods.tree_sum(stats[..., :mod.num_stats], 2)  # over q blocks
  return tuple(mod.stats_to_grads(stats))


def _stats_width(cfg, params) -> int:
  if cfg.score_mod is None:
    return 0
  n = score_mods.rebuild(cfg.score_mod, params).num_stats
  return next_power_of_2(n) if n else 0


def backward(q, k, v, out, lse, do, delta, lists, params, cfg):
  del out
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  group = h // hkv
  bq, bk = cfg.block_q, cfg.block_kv
  nq, nk = lq // bq, lk // bk
  validate_blocks(bq, bk, d)
  tuning = cfg.tuning or TuningConfig()
  compiler = pltriton.CompilerParams(num_warps=tuning.warps("bwd", d),
                                     num_stages=tuning.num_stages_bwd)
  do = do.astype(q.dtype)
  segs = ["q_seg", "kv_seg"] if cfg.segments else []
  seg_args = ([lists["q_segments"], lists["kv_segments"]] if cfg.segments
              else [])
  pnames = _param_names(params)
  width = _stats_width(cfg, params)

  row = lambda i, hh, bb: (bb, hh, nq - 1 - i)
  q_blk = pl.BlockSpec((None, bq, None, d),
                       lambda i, hh, bb: (bb, nq - 1 - i, hh, 0))
  kv_all = pl.BlockSpec((None, lk, None, d),
                        lambda i, hh, bb: (bb, 0, hh // group, 0))
  lnames = _list_names(cfg)
  out_names = ("dq", "stats") if width else ("dq",)
  out_specs = [q_blk]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if width:
    out_specs.append(pl.BlockSpec((None, None, None, width),
                                  lambda i, hh, bb: (bb, hh, nq - 1 - i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, nq, width), jnp.float32))
  res = pl.pallas_call(
      functools.partial(
          _dq_kernel, cfg=cfg, nq=nq, sk=tuning.sub("sub_kv_dq", bk),
          width=width,
          names=(*lnames, "q", "k", "v", "do", "lse", "delta", *segs,
                 *pnames, *out_names)),
      grid=(nq, h, b),
      in_specs=_list_specs(lists, lnames, row) + [
          q_blk, kv_all, kv_all, q_blk,
          pl.BlockSpec((None, None, bq), row),
          pl.BlockSpec((None, None, bq), row)]
      + _seg_specs(cfg, bq, lambda i, hh, bb: (bb, nq - 1 - i), lk,
                   lambda i, hh, bb: (bb, 0)) + _param_specs(params),
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compiler, interpret=cfg.interpret,
      name="sparsejax_block_sparse_dq",
  )(*[lists[n] for n in lnames], q, k, v, do, lse, delta, *seg_args, *params)
  dq = res[0]
  dparams = _param_grads(cfg, params, res[1]) if width else (None,) * len(
      params)

  col = lambda j, hh, bb: (bb, hh, j)
  kv_blk = pl.BlockSpec((None, bk, None, d),
                        lambda j, hh, bb: (bb, j, hh // group, 0))
  q_all = pl.BlockSpec((None, lq, None, d), lambda j, hh, bb: (bb, 0, hh, 0))
  row_all = pl.BlockSpec((None, None, lq), lambda j, hh, bb: (bb, hh, 0))
  dkv_dtype = k.dtype if group == 1 else jnp.float32
  out_blk = pl.BlockSpec((None, bk, None, d), lambda j, hh, bb: (bb, j, hh, 0))
  tnames = _list_names(cfg, "_t")
  seg_t = ["kv_seg", "q_seg"] if cfg.segments else []
  dk, dv = pl.pallas_call(
      functools.partial(
          _dkv_kernel, cfg=cfg, sq=tuning.sub("sub_q_dkv", bq),
          names=(*tnames, "k", "v", "q", "do", "lse", "delta", *seg_t,
                 *pnames, "dk", "dv")),
      grid=(nk, h, b),
      in_specs=_list_specs(lists, tnames, col) + [
          kv_blk, kv_blk, q_all, q_all, row_all, row_all]
      + _seg_specs(cfg, bk, lambda j, hh, bb: (bb, j), lq,
                   lambda j, hh, bb: (bb, 0)) + _param_specs(params),
      out_specs=[out_blk, out_blk],
      out_shape=[jax.ShapeDtypeStruct((b, lk, h, d), dkv_dtype)] * 2,
      compiler_params=compiler, interpret=cfg.interpret,
      name="sparsejax_block_sparse_dkv",
  )(*[lists[n] for n in tnames], k, v, q, do, lse, delta, *seg_args[::-1],
    *params)
  if group > 1:  # sum the q heads of each kv head
    dk = dk.reshape(b, lk, hkv, group, d).sum(3).astype(k.dtype)
    dv = dv.reshape(b, lk, hkv, group, d).sum(3).astype(v.dtype)
  return dq, dk, dv, dparams


def _pad_width(idx):
  w = next_power_of_2(idx.shape[-1])
  return jnp.pad(idx, [(0, 0)] * (idx.ndim - 1) + [(0, w - idx.shape[-1])],
                 mode="edge")


_attention = make_vjp(forward, backward)


def attention(q, k, v, lists, params, cfg):
  """custom_vjp attention; index lists are padded to power-of-two widths
  (Triton block shapes) once, here, for the forward and both backward
  kernels."""
  lists = {f: _pad_width(x) if "_idx" in f else x for f, x in lists.items()}
  return _attention(q, k, v, lists, params, cfg)
