"""`sj.attention`'s implementation call under a device mesh.

`run` takes the call as `sj.attention` prepares it (block-padded q, k, v,
the BlockMask, segment ids, score-mod params, StaticConfig) and

  * with no mesh in context: builds the lists and calls the
    implementation, as before;
  * under a mesh: runs it per shard (shard_map): batch over data/fsdp,
    heads over tensor; the mask's [B|1, H|1, ...] lists and the segment ids
    split with them (size-1 dims replicated), and the lists are broadcast
    and refined on each shard. A mask function or score mod that reads the
    batch or head index gets each shard's offsets (offsets.py);
  * with a `context` axis that divides the sequence into whole blocks: the
    ring of context_parallel.py, queries local, K/V passed around.

`per_shard_with_mask_fn` does the batch/head part for other ops whose
static config carries a BlockMask's mask function (Scatterbrain).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from sparsejax.block_sparse import segments as segments_lib
from sparsejax.block_sparse.block_mask import broadcast_lists
from sparsejax.parallel import context_parallel
from sparsejax.parallel import offsets as offsets_lib
from sparsejax.parallel import shard

_QKV, _LSE = "b.h.", "bh."


def lists_for(mask, segs, batch: int, heads: int) -> dict:
  """The kernel lists of a (local) mask: broadcast, or refined by ids."""
  if segs is None:
    return broadcast_lists(mask, batch, heads)
  return segments_lib.refine(mask, *segs, batch=batch, heads=heads)


def run(fn: Callable, q, k, v, mask, segs, params, cfg) -> Any:
  """fn(q, k, v, lists, params, cfg) -> (out, lse), per shard under the
  mesh in context (see the module docstring)."""
  b, h = q.shape[0], q.shape[2]
  args = (q, k, v, mask, segs, params)
  layouts = (_QKV, _QKV, _QKV, "bh", "b", "")
  mesh = shard.current_mesh()
  if mesh is not None:
    ring = context_parallel.plan(q, k, mask, cfg, mesh)
    if ring is not None:
      return context_parallel.attention(fn, ring, q, k, v, mask, segs,
                                        params, cfg)
  plan = shard.make_plan(args, layouts, mesh=mesh, name="attention")
  if plan is None:
    return fn(q, k, v, lists_for(mask, segs, b, h), params, cfg)
  nb, nh = plan.count("b"), plan.count("h")
  bl, hl = b // nb, h // nh
  used = offsets_lib.uses(cfg, params)
  nb, nh = (nb if "b" in used else 1), (nh if "h" in used else 1)
  variants = [offsets_lib.shifted_config(
      cfg, params, (i * bl, j * hl, 0, 0), global_bh=(b, h),
      local_bh=(bl, hl)) for i in range(nb) for j in range(nh)]

  def local(q, k, v, mask, segs, params):
    lists = lists_for(mask, segs, q.shape[0], q.shape[2])
    return offsets_lib.switch(_variant_index(plan, nb, nh), variants,
                              lambda c: fn(q, k, v, lists, params, c))

  return plan.run(local, args, layouts, (_QKV, _LSE))


def _variant_index(plan, nb: int, nh: int):
  return ((plan.index("b") if nb > 1 else 0) * nh +
          (plan.index("h") if nh > 1 else 0))


def per_shard_with_mask_fn(fn: Callable, args: Sequence[Any],
                           in_layouts: Sequence[str], out_layouts, cfg, *,
                           batch: int, heads: int, name: str):
  """fn(*args, cfg) per (batch, head) shard under the mesh in context, with
  cfg.mask_fn seeing global (b, h) on every shard (offsets.py); fn(*args,
  cfg) itself with no mesh."""
  plan = shard.make_plan(args, in_layouts, name=name)
  if plan is None:
    return fn(*args, cfg)
  nb, nh = plan.count("b"), plan.count("h")
  bl, hl = batch // nb, heads // nh
  used = offsets_lib.coords_used(cfg.mask_fn)
  nb, nh = (nb if "b" in used else 1), (nh if "h" in used else 1)
  variants = [dataclasses.replace(cfg, mask_fn=offsets_lib.shift_mask_fn(
      cfg.mask_fn, (i * bl, j * hl, 0, 0)))
              for i in range(nb) for j in range(nh)]

  def local(*local_args):
    return offsets_lib.switch(_variant_index(plan, nb, nh), variants,
                              lambda c: fn(*local_args, c))

  return plan.run(local, args, in_layouts, out_layouts)
