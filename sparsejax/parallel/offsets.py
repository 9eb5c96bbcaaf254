"""Global coordinates for kernels that run on one shard.

Inside `shard_map` a kernel sees local arrays, so the (b, h, q_idx, kv_idx)
it hands to a mask function or a score mod are local too. The kernels take
these functions as static configuration (evaluated in registers), so the
shard's offsets cannot be traced values: each shard gets its own static
variant (`shift_mask_fn`, `ShiftedMod`) and `switch` picks the variant of
the running shard. Variants exist only for the coordinates a function reads
(`coords_used`), and masks that depend on q - kv alone (causal, windows,
bands) are rewritten to one function of the difference, so equal
differences share one kernel: a causal ring of n shards compiles 2n - 1
forward kernels, a head-sharded causal or S2 mask one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.extend as jex
import jax.numpy as jnp

from sparsejax.block_sparse import mask_fns
from sparsejax.block_sparse import score_mods

COORDS = ("b", "h", "q", "kv")
# Marks a function of q - kv alone (offsets fold into the difference).
DIFFERENCE = "q-kv"
Offsets = Tuple[int, int, int, int]  # added to (b, h, q_idx, kv_idx)


# --- which coordinates a function reads ---------------------------------------


def _dependencies(jaxpr, deps) -> frozenset:
  for eqn in jaxpr.eqns:
    d = frozenset().union(*(deps.get(v, frozenset()) for v in eqn.invars
                            if not isinstance(v, jex.core.Literal)))
    for o in eqn.outvars:
      deps[o] = d
  return frozenset().union(*(deps.get(v, frozenset()) for v in jaxpr.outvars
                             if not isinstance(v, jex.core.Literal)))


def _trace_coords(fn, is_mod: bool) -> frozenset:
  coords = (jnp.int32(0), jnp.int32(0), jnp.zeros((2, 2), jnp.int32),
            jnp.zeros((2, 2), jnp.int32))
  try:
    if is_mod:
      closed = jax.make_jaxpr(lambda s, *c: fn(s, *c))(
          jnp.zeros((2, 2), jnp.float32), *coords)
    else:
      closed = jax.make_jaxpr(lambda *c: fn(*c))(*coords)
  except Exception:  # pylint: disable=broad-except
    return frozenset(COORDS)  # cannot tell: assume it reads everything
  invars = closed.jaxpr.invars[-4:]
  used = _dependencies(closed.jaxpr, {v: frozenset({c})
                                      for v, c in zip(invars, COORDS)})
  if _difference_only(closed.jaxpr, [invars[2]], [invars[3]]):
    used = used | {DIFFERENCE}
  return used


def _inner_jaxprs(eqn):
  """(jaxpr, operands) of the sub-programs of a cond or a call, else []."""
  if eqn.primitive.name == "cond":
    return [(b.jaxpr, eqn.invars[1:]) for b in eqn.params["branches"]]
  for key in ("jaxpr", "call_jaxpr"):
    inner = eqn.params.get(key)
    if inner is not None:
      return [(getattr(inner, "jaxpr", inner), eqn.invars)]
  return []


def _difference_only(jaxpr, qs, kvs) -> bool:
  """Whether the vars qs and kvs enter only as q - kv or kv - q (then the
  function depends on their difference alone); looks inside conds and
  calls."""
  qs, kvs = set(qs), set(kvs)
  for eqn in jaxpr.eqns:
    ins = [v for v in eqn.invars if not isinstance(v, jex.core.Literal)]
    if not any(v in qs or v in kvs for v in ins):
      continue
    if eqn.primitive.name == "sub" and len(ins) == 2 and (
        (ins[0] in qs and ins[1] in kvs) or (ins[0] in kvs and ins[1] in qs)):
      continue
    inner = _inner_jaxprs(eqn)
    if not inner:
      return False
    for sub, operands in inner:
      iq = [w for v, w in zip(operands, sub.invars)
            if not isinstance(v, jex.core.Literal) and v in qs]
      ik = [w for v, w in zip(operands, sub.invars)
            if not isinstance(v, jex.core.Literal) and v in kvs]
      if not _difference_only(sub, iq, ik):
        return False
  return True


@functools.lru_cache(maxsize=256)
def _fn_coords(fn) -> frozenset:
  return _trace_coords(fn, False)


@functools.lru_cache(maxsize=256)
def _mod_coords(treedef, avals) -> frozenset:
  # Traced over zeros of the leaves' shapes: the structure is what counts,
  # and the leaves may be tracers of an enclosing jit.
  leaves = [jnp.zeros(shape, dtype) for shape, dtype in avals]
  return _trace_coords(jax.tree.unflatten(treedef, leaves), True)


def coords_used(fn, is_mod: bool = False) -> frozenset:
  """The subset of {"b", "h", "q", "kv"} that fn(b, h, q, kv) (or a score
  mod's mod(score, b, h, q, kv)) depends on, from its jaxpr (conservative:
  every output of an equation depends on all its inputs)."""
  if fn is None:
    return frozenset()
  if is_mod:
    leaves, treedef = jax.tree.flatten(fn)
    return _mod_coords(treedef, tuple((tuple(x.shape), jnp.result_type(x))
                                      for x in leaves))
  try:
    hash(fn)
  except TypeError:
    return frozenset(COORDS)
  return _fn_coords(fn)


def relevant(offsets: Offsets, used: frozenset) -> Offsets:
  """Offsets with the coordinates nobody reads set to 0, and those of a
  function of q - kv folded into q (so shards that differ only there share
  a variant)."""
  ob, oh, oq, okv = (o if c in used else 0 for o, c in zip(offsets, COORDS))
  if DIFFERENCE in used:
    oq, okv = oq - okv, 0
  return ob, oh, oq, okv


# --- shifted mask functions ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shifted:
  """fn at global coordinates: fn(b + ob, h + oh, q + oq, kv + okv)."""
  fn: Any
  offsets: Offsets

  def __call__(self, b, h, q, kv):
    ob, oh, oq, okv = self.offsets
    return self.fn(b + ob, h + oh, q + oq, kv + okv)


def _shift_causal(fn, delta):
  return mask_fns.Causal(fn.offset + delta)


def _shift_window(fn, delta):
  # d = q - kv becomes d + delta.
  if fn.causal:
    return mask_fns.Band(-delta, fn.window - 1 - delta)
  return mask_fns.Band(1 - fn.window - delta, fn.window - 1 - delta)


def _shift_band(fn, delta):
  return mask_fns.Band(None if fn.lo is None else fn.lo - delta,
                       None if fn.hi is None else fn.hi - delta)


# Mask functions of q - kv alone, rewritten for a difference `delta`.
_DIFFERENCE_RULES = {mask_fns.Causal: _shift_causal,
                     mask_fns.SlidingWindow: _shift_window,
                     mask_fns.Band: _shift_band}


def shift_mask_fn(fn, offsets: Offsets):
  """The mask function at global coordinates (fn itself at zero offsets)."""
  if fn is None:
    return None
  offsets = relevant(offsets, coords_used(fn))
  if not any(offsets):
    return fn
  rule = _DIFFERENCE_RULES.get(type(fn))
  if rule is not None:
    return rule(fn, offsets[2] - offsets[3])
  return Shifted(fn, offsets)


# --- shifted score mods -------------------------------------------------------


class ShiftedMod:
  """A score mod at global coordinates; its leaves are the inner mod's.

  Kernels rebuild it over their parameter refs, evaluate it at shifted
  coordinates, and hand it statistics of the local [B, H] block:
  `stats_to_grads` places them in the global [B, H] frame first, so the
  inner mod's rule sees the shape it expects (XLA then adds the shards).
  """

  def __init__(self, inner, offsets: Offsets, global_bh: Tuple[int, int],
               local_bh: Tuple[int, int]):
    self.inner, self.offsets = inner, tuple(offsets)
    self.global_bh, self.local_bh = tuple(global_bh), tuple(local_bh)

  def _at(self, b, h, q, kv):
    ob, oh, oq, okv = self.offsets
    return b + ob, h + oh, q + oq, kv + okv

  def __call__(self, score, b, h, q_idx, kv_idx):
    return self.inner(score, *self._at(b, h, q_idx, kv_idx))

  @property
  def additive(self):
    return getattr(self.inner, "additive", False)

  @property
  def num_stats(self):
    return self.inner.num_stats

  def tile_stats(self, g, score, b, h, q_idx, kv_idx, width):
    return self.inner.tile_stats(g, score, *self._at(b, h, q_idx, kv_idx),
                                 width)

  def stats_to_grads(self, stats):
    if self.global_bh != self.local_bh:
      (gb, gh), (ob, oh) = self.global_bh, self.offsets[:2]
      full = jnp.zeros((gb, gh) + stats.shape[2:], stats.dtype)
      stats = jax.lax.dynamic_update_slice(
          full, stats, (ob, oh) + (0,) * (stats.ndim - 2))
    return self.inner.stats_to_grads(stats)

  def kernel_unsupported(self, impl):
    own = getattr(type(self.inner), "kernel_unsupported", None)
    if own is None or own is score_mods.ScoreMod.kernel_unsupported:
      return None  # checked on the inner mod before the kernel was chosen
    return self.inner.kernel_unsupported(impl)


class ShiftedModWithWeights(ShiftedMod):
  """`ShiftedMod` of a mod with per-row statistic weights (Mosaic GPU)."""

  def stat_weights(self, score, b, h, q_idx, kv_idx):
    return self.inner.stat_weights(score, *self._at(b, h, q_idx, kv_idx))


def _flatten_shifted(mod):
  leaves, treedef = jax.tree.flatten(mod.inner)
  return leaves, (treedef, mod.offsets, mod.global_bh, mod.local_bh)


for _cls in (ShiftedMod, ShiftedModWithWeights):
  jax.tree_util.register_pytree_node(
      _cls, _flatten_shifted,
      functools.partial(
          lambda cls, aux, leaves: cls(jax.tree.unflatten(aux[0], leaves),
                                       *aux[1:]), _cls))
del _cls


def shift_score_mod(mod, offsets: Offsets, global_bh, local_bh):
  """The mod at global coordinates (mod itself at zero offsets)."""
  if mod is None:
    return None
  used = coords_used(mod, is_mod=True)
  offsets = relevant(offsets, used)
  # A mod that reads b or h takes [B, H] statistics in the global frame,
  # which the first shard (zero offsets) needs too.
  reframe = bool({"b", "h"} & used) and tuple(global_bh) != tuple(local_bh)
  if not any(offsets) and not reframe:
    return mod
  cls = (ShiftedModWithWeights if score_mods.has_stat_weights(mod)
         else ShiftedMod)
  return cls(mod, offsets, global_bh, local_bh)


def shifted_config(cfg, params, offsets: Offsets, *, global_bh, local_bh,
                   **replace):
  """A block-sparse StaticConfig whose mask function and score mod see
  global coordinates (plus any field replacements, e.g. local lengths)."""
  mod = score_mods.rebuild(cfg.score_mod, params)
  mod = shift_score_mod(mod, offsets, global_bh, local_bh)
  return dataclasses.replace(
      cfg, mask_fn=shift_mask_fn(cfg.mask_fn, offsets),
      score_mod=None if mod is None else jax.tree.structure(mod), **replace)


def uses(cfg, params) -> frozenset:
  """Coordinates read by a block-sparse call's mask function or score mod."""
  mod = score_mods.rebuild(cfg.score_mod, params)
  return coords_used(cfg.mask_fn) | coords_used(mod, is_mod=True)


# --- one variant per shard ----------------------------------------------------


def switch(index, variants: Sequence[Any], call: Callable[[Any], Any]):
  """call(variants[index]) for a traced shard index; equal variants share
  one branch, and a single distinct variant needs no switch."""
  unique, table = [], []
  for v in variants:
    if v not in unique:
      unique.append(v)
    table.append(unique.index(v))
  if len(unique) == 1:
    return call(unique[0])
  branch = jnp.asarray(table, jnp.int32)[index]
  return jax.lax.switch(branch, [functools.partial(call, v) for v in unique])


def count_distinct(variants: Sequence[Any]) -> int:
  out: list = []
  for v in variants:
    if v not in out:
      out.append(v)
  return len(out)


def check_offsets(offsets: Optional[Offsets]) -> Offsets:
  return (0, 0, 0, 0) if offsets is None else tuple(int(o) for o in offsets)
