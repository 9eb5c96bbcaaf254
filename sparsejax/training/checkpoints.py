"""Orbax checkpoints of the train state plus the data iterator state.

Each save writes `<dir>/<step>/{state,data}`: `state` is the train state as a
flat {path: array} dict (robust to pytree node types, restorable with any
sharding), `data` is the grain iterator state (one JSON file per process).
Orbax writes into a temporary directory and renames it when complete, so an
interrupted save never replaces the latest readable checkpoint: the
half-written directory is ignored (and removed on the next start).
"""

import os
from typing import Any, Optional

from absl import logging
import grain.checkpoint as grain_ckpt
import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be read."""


def _name(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(
        k, "idx", k)))))
  return "/".join(parts)


def flatten(tree: Any) -> dict[str, Any]:
  """Pytree -> {"a/b/0/c": leaf}: what goes on disk."""
  flat = {_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  if len(flat) != len(jax.tree.leaves(tree)):
    raise ValueError("pytree paths are not unique after flattening")
  return flat


def unflatten(template: Any, flat: dict[str, Any]) -> Any:
  """Inverse of `flatten`, using `template` for the tree structure."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  return jax.tree.unflatten(treedef, [flat[_name(p)] for p, _ in paths])


def restore_matching(params: Any, directory: str,
                     step: Optional[int] = None) -> Any:
  """`params` with every leaf that another run's checkpoint also has.

  For starting a model from a related run (SeerAttention's gates on a dense
  LM): a leaf is taken when the checkpoint holds "params/<its path>" with
  the same shape; the others (the gates) keep their values. Raises
  FileNotFoundError without a checkpoint, ValueError on a shape mismatch or
  when nothing matches.
  """
  manager = ocp.CheckpointManager(os.path.abspath(directory),
                                  item_names=("state", "data"))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  saved = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))["state"]
  manager.close()
  flat, taken = flatten(params), 0
  for path, leaf in flat.items():
    value = saved.get("params/" + path)
    if value is None:
      continue
    if tuple(value.shape) != tuple(leaf.shape):
      raise ValueError(f"init_from: params/{path} has shape {value.shape} in "
                       f"{directory}, the model has {leaf.shape}")
    flat[path] = jax.device_put(value, getattr(leaf, "sharding", None))
    taken += 1
  if not taken:
    raise ValueError(f"init_from: no parameter of the model is in "
                     f"{directory} (step {step})")
  logging.info("init_from: %d of %d params from %s step %d", taken,
               len(flat), directory, step)
  return unflatten(params, flat)


class Checkpointer:
  """Save every `every` steps, keep the newest `keep`, resume exactly."""

  def __init__(self, directory: str, *, every: int, keep: int,
               async_save: bool = False):
    self.directory = os.path.abspath(directory)
    self.every = max(int(every), 1)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            # Half-written (interrupted) saves are never listed; drop them.
            cleanup_tmp_directories=True),
        item_names=("state", "data"))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iter=None, *,
           force: bool = False) -> bool:
    """Saves if `step` is a multiple of `every` (or `force`).

    Returns whether it saved. The policy is ours, not orbax's (which would
    also save the first step it sees).
    """
    if not force and step % self.every:
      return False
    items = dict(state=ocp.args.StandardSave(flatten(state)))
    if data_iter is not None:
      items["data"] = grain_ckpt.CheckpointSave(data_iter)
    saved = self._manager.save(step, args=ocp.args.Composite(**items),
                               force=True)
    if saved:
      logging.info("saved checkpoint %d in %s", step, self.directory)
    return saved

  def restore(self, template: Any, data_iter=None, *,
              step: Optional[int] = None):
    """Restores `step` (default: latest) into the structure of `template`.

    `template` holds arrays (or ShapeDtypeStructs) with the target shardings;
    `data_iter` has its state set in place.

    Returns:
      (state, step), or (None, None) if there is no checkpoint.

    Raises:
      CheckpointError: the checkpoint is missing pieces or unreadable; the
        message lists the other steps, which `step=` can restore.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None, None
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, "sharding", None)),
        flatten(template))
    items = dict(state=ocp.args.StandardRestore(abstract))
    if data_iter is not None:
      items["data"] = grain_ckpt.CheckpointRestore(data_iter)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      state = unflatten(template, restored["state"])
    except Exception as e:  # orbax raises many types for damaged files
      others = [s for s in self.all_steps() if s != step]
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} is corrupt or "
          f"incomplete ({type(e).__name__}: {e}). Other steps: {others}; "
          "restore one with step=..., or delete the bad step directory."
      ) from e
    logging.info("restored checkpoint %d from %s", step, self.directory)
    return state, step

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
