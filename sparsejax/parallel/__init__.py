"""`sj.parallel`: every kernel on its local shard under a device mesh.

  mesh = jax.make_mesh((2, 2, 2), ("data", "tensor", "context"))
  with jax.set_mesh(mesh):
    out = jax.jit(sj.attention)(q, k, v, mask)  # per shard, ring over context

`per_shard` wraps an implementation call in shard_map (batch over
data/fsdp, heads over tensor); `sj.attention` adds context parallelism over
a `context` axis (context_parallel.py). With no mesh in context nothing
changes.
"""

from sparsejax.parallel.shard import (BATCH_AXES, CONTEXT_AXIS, HEAD_AXIS,
                                      Plan, current_mesh, make_plan,
                                      per_shard)

__all__ = ["per_shard", "make_plan", "Plan", "current_mesh", "BATCH_AXES",
           "HEAD_AXIS", "CONTEXT_AXIS"]
