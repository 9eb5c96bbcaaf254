"""Device mesh (data, fsdp, tensor, context) and shardings for params and
batches.

Parameters are matched by name to logical axes (heads and MLP hidden on
`tensor`, the model dim on `fsdp`); an axis that does not divide its
dimension is dropped (replicated), so any mesh runs any model. Token
arrays [batch, seq] split their sequence over `context`; the attention
kernels then run per shard with a K/V ring (sparsejax.parallel), which
needs the steps to run under `jax.set_mesh(mesh)` (see train.py).
"""

import os
import re
from typing import Any

from absl import logging
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor", "context")
BATCH_AXES = ("data", "fsdp")

# Last path component -> mesh axis per dimension (first match wins).
PARAM_RULES = (
    (r"^w[qkv]$", ("fsdp", "tensor", None)),  # [d, heads, head_dim]
    (r"^wo$", ("tensor", None, "fsdp")),  # [heads, head_dim, d]
    (r"^w_(gate|up)$", ("fsdp", "tensor")),  # [d, mlp]
    (r"^w_down$", ("tensor", "fsdp")),  # [mlp, d]
    (r"^embedding$", ("tensor", "fsdp")),  # [vocab, d]
    (r"^kernel$", ("fsdp", "tensor")),  # dense [in, out]
    (r"^w_patch$", (None, "fsdp")),
)

# Environment variables that mean "one process per host of a multi-host job".
_MULTI_HOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS",
                   "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when launched on several hosts.

  Detected from coordinator / TPU-pod / SLURM / Open MPI environment
  variables; a no-op for single-process runs.
  """
  multi = any(os.environ.get(k) for k in _MULTI_HOST_ENV)
  for count in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    multi |= int(os.environ.get(count, "1") or 1) > 1
  if multi and not jax.distributed.is_initialized():
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d", jax.process_index(),
                 jax.process_count())


def make_mesh(cfg, devices=None) -> jax.sharding.Mesh:
  """Mesh with axes data/fsdp/tensor/context sized from `cfg` (-1: the
  remainder; a missing axis is 1)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(cfg.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs "
                     f"{int(np.prod(sizes))} devices, have {len(devices)}")
  # Auto axes: GSPMD propagates shardings through the model code, which then
  # needs no sharding annotations (jax.make_mesh defaults to Explicit).
  return jax.make_mesh(tuple(sizes), AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def _param_name(path) -> str:
  # Dict keys name parameters; nnx.Variable adds a trailing `.value`.
  keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(keys[-1]) if keys else ""


def _spec(path, shape, mesh) -> P:
  name = _param_name(path)
  for pattern, axes in PARAM_RULES:
    if re.search(pattern, name) and len(axes) == len(shape):
      return P(*(a if a and dim % mesh.shape[a] == 0 else None
                 for a, dim in zip(axes, shape)))
  return P()


def param_shardings(params: Any, mesh) -> Any:
  """NamedShardings for a params pytree (e.g. an `nnx.State`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, _spec(path, x.shape, mesh)), params)


def replicated(tree: Any, mesh) -> Any:
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def batch_sharding(mesh, shape=None) -> NamedSharding:
  """Leading (batch) dim split over data x fsdp; the sequence of a
  [batch, seq] array also over context (when it divides)."""
  n = dict(zip(mesh.axis_names, mesh.axis_sizes)).get("context", 1)
  if shape is not None and len(shape) == 2 and n > 1 and shape[1] % n == 0:
    return NamedSharding(mesh, P(BATCH_AXES, "context"))
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: dict, mesh) -> dict:
  """Host-local numpy batch -> global arrays (works on one or many hosts)."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(
        batch_sharding(mesh, v.shape), v)
  return out
