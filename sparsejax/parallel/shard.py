"""Run an op's implementation on its local shard under a device mesh.

Pallas kernels are opaque custom calls to XLA's partitioner: under a mesh it
could only run them on gathered, replicated operands. `per_shard` wraps a
call in `jax.shard_map` over the mesh in context (`jax.set_mesh(mesh)`, as
MaxText wraps splash attention), so each device runs the kernel on its own
batch and heads, forward and backward (a custom_vjp inside shard_map). With
no mesh in context, or one whose axes the call cannot use, the call runs
unchanged.

Layouts name, per argument (or output), the mesh axis of each leading dim:
  "b"  batch: split over the mesh axes `data` and `fsdp`;
  "h"  heads: split over `tensor` (q heads and kv heads alike, so each GQA
       group stays on one shard);
  "s"  sequence: split over `context` (only ops that handle it; see
       context_parallel.py);
  "."  whole.
Trailing dims past the layout are whole; every array leaf of an argument
takes its layout (a BlockMask's [B|1, H|1, ...] arrays take "bh"), and a
dim of size 1 stays replicated (a mask shared by every head).

An axis the call cannot split (heads not divisible by `tensor`, a batch of
1) is left out: the devices along it compute the same result.

  o = per_shard(fn, ("b.h.", "b.h.", "b.h.", "h"), "b.h.")(q, k, v, slopes)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
CONTEXT_AXIS = "context"
_LETTERS = "bhs."
_WARNED = set()


def current_mesh():
  """The mesh in context (`jax.set_mesh` / `use_abstract_mesh`), or None
  when there is none, it has one device, or the caller is already inside a
  shard_map (manual axes)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.axis_sizes) == 1:
    return None
  if any(t == AxisType.Manual for t in mesh.axis_types):
    return None
  return mesh


def axis_size(mesh, name: str) -> int:
  return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(name, 1)


def _check_layout(layout: str):
  if not isinstance(layout, str) or set(layout) - set(_LETTERS):
    raise ValueError(f"a layout is a string of {_LETTERS!r} (batch, heads, "
                     f"sequence, whole), got {layout!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which mesh axes split which logical dims of one call."""
  mesh: Any
  batch: Tuple[str, ...] = ()
  heads: Optional[str] = None
  sequence: Optional[str] = None

  def axes(self, letter: str) -> Tuple[str, ...]:
    return {"b": self.batch, "h": (self.heads,) if self.heads else (),
            "s": (self.sequence,) if self.sequence else ()}.get(letter, ())

  def count(self, letter: str) -> int:
    return math.prod(axis_size(self.mesh, a) for a in self.axes(letter))

  @property
  def trivial(self) -> bool:
    return all(self.count(c) == 1 for c in "bhs")

  def index(self, letter: str):
    """This shard's index along a logical dim (inside the shard_map)."""
    axes = self.axes(letter)
    if not axes:
      return jnp.int32(0)
    return jax.lax.axis_index(axes if len(axes) > 1 else axes[0])

  def spec(self, layout: str, shape: Optional[Sequence[int]] = None) -> P:
    dims = []
    for i, c in enumerate(layout):
      axes = self.axes(c)
      if not axes or (shape is not None and shape[i] == 1):
        dims.append(None)
      else:
        dims.append(axes if len(axes) > 1 else axes[0])
    while dims and dims[-1] is None:
      dims.pop()
    return P(*dims)

  def run(self, fn: Callable, args: Sequence[Any], in_layouts: Sequence[str],
          out_layouts):
    """fn(*local args) under shard_map; out_layouts: a layout string per
    output (a pytree prefix of fn's result)."""
    flat, treedef = jax.tree.flatten(tuple(args))
    specs = []
    for arg, layout in zip(args, in_layouts):
      for leaf in jax.tree.leaves(arg):
        if leaf.ndim < len(layout):
          raise ValueError(f"layout {layout!r} has more dims than an "
                           f"argument of shape {leaf.shape}")
        specs.append(self.spec(layout, leaf.shape))
    out_specs = jax.tree.map(self.spec, out_layouts)

    def local(*leaves):
      return fn(*jax.tree.unflatten(treedef, leaves))

    # check_vma=False: Pallas calls and custom_vjps carry no varying-axes
    # annotations; cotangents of replicated inputs are still summed.
    return jax.shard_map(local, mesh=self.mesh, in_specs=tuple(specs),
                         out_specs=out_specs, check_vma=False)(*flat)


def _warn_once(key, msg, *args):
  if key not in _WARNED:
    _WARNED.add(key)
    logging.info(msg, *args)


def _sizes(args, in_layouts) -> Dict[str, set]:
  sizes = {c: set() for c in "bhs"}
  for arg, layout in zip(args, in_layouts):
    _check_layout(layout)
    for leaf in jax.tree.leaves(arg):
      for c, n in zip(layout, leaf.shape):
        if c in sizes and n != 1:
          sizes[c].add(int(n))
  return sizes


def make_plan(args: Sequence[Any], in_layouts: Sequence[str], *, mesh=None,
              sequence: bool = False, name: str = "op") -> Optional[Plan]:
  """The plan for these arguments on the mesh in context, or None (no mesh,
  or nothing to split)."""
  mesh = current_mesh() if mesh is None else mesh
  if mesh is None:
    return None
  if len(in_layouts) != len(args):
    raise ValueError(f"need one layout per argument: {len(args)} arguments, "
                     f"{len(in_layouts)} layouts")
  sizes = _sizes(args, in_layouts)
  divides = lambda n, c: all(s % n == 0 for s in sizes[c])
  batch, used = [], 1
  for a in BATCH_AXES:
    n = axis_size(mesh, a)
    if n > 1 and sizes["b"] and divides(used * n, "b"):
      batch.append(a)
      used *= n
    elif n > 1:
      _warn_once((name, a, tuple(sizes["b"])), "sparsejax %s: batch %s does "
                 "not split over mesh axis %r (%d): replicated along it",
                 name, sorted(sizes["b"]), a, n)
  heads = None
  n = axis_size(mesh, HEAD_AXIS)
  if n > 1 and sizes["h"] and divides(n, "h"):
    heads = HEAD_AXIS
  elif n > 1:
    _warn_once((name, HEAD_AXIS, tuple(sizes["h"])), "sparsejax %s: heads %s"
               " do not split over mesh axis %r (%d): replicated along it",
               name, sorted(sizes["h"]), HEAD_AXIS, n)
  seq = None
  n = axis_size(mesh, CONTEXT_AXIS)
  if sequence and n > 1 and sizes["s"] and divides(n, "s"):
    seq = CONTEXT_AXIS
  plan = Plan(mesh, tuple(batch), heads, seq)
  return None if plan.trivial else plan


def per_shard(fn: Callable, in_layouts: Sequence[str], out_layouts,
              name: Optional[str] = None) -> Callable:
  """fn wrapped to run on each device's shard under the mesh in context.

  Args:
    fn: the implementation call, fn(*args) -> outputs; its static
      arguments bound already (functools.partial).
    in_layouts: one layout string per positional argument (see module doc).
    out_layouts: a layout string per output, as a pytree prefix of fn's
      result ("b.h." for one array, ("b.h.", "bh..") for a pair).
    name: the op's name in log lines.

  Returns:
    A function of the same arguments: fn itself with no mesh in context.
  """
  name = name or getattr(fn, "__name__", "op")

  def wrapped(*args):
    plan = make_plan(args, in_layouts, name=name)
    if plan is None:
      return fn(*args)
    return plan.run(fn, args, in_layouts, out_layouts)

  return wrapped
