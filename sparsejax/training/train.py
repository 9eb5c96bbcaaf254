"""Training and evaluation: `train_and_evaluate(config, workdir)`.

The model is an NNX module split once into (graphdef, params, model_state,
consts); the step is a pure function of arrays, `jax.jit`ted with donated
state and explicit shardings. consts holds the static attention masks (never
differentiated, never donated, never checkpointed). model_state holds the
`StepState` variables a forward updates (k-means centroids): carried and
checkpointed in the train state, never differentiated. Layers may write
`AuxLoss` terms, which the step adds to the task loss. `config.trainable`
(a regex on parameter paths, e.g. "attn/gate/") trains only the matching
params; `config.init_from` starts a new run from another run's params (e.g.
a dense checkpoint for SeerAttention's gate distillation).
"""

import functools
import os
import re
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparsejax import data
from sparsejax import nn
from sparsejax.nn.layers import AuxLoss, StepState
from sparsejax.training import checkpoints
from sparsejax.training import metrics as metrics_lib
from sparsejax.training import optimizer as optimizer_lib
from sparsejax.training import sharding
from sparsejax.training import tasks


# ----------------------------------------------------------------------------
# Setup.
# ----------------------------------------------------------------------------


class Experiment:
  """Model, optimizer, task and shardings built from a config."""

  def __init__(self, config, devices=None):
    sharding.maybe_initialize_distributed()
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh, devices)
    if self.mesh.size > 1:  # say where the kernels run per shard
      logging.warning("mesh %s on %d %s devices", dict(self.mesh.shape),
                      self.mesh.size, self.mesh.devices.flat[0].platform)
    self.info = data.task_info(config.data)
    self.task = tasks.get_task(self.info["kind"])
    model = nn.build_model(config, self.info, seed=config.seed)
    self.flops_per_token = model.flops_per_token()
    self.tokens_per_example = model.seq_len
    self.graphdef, params, model_state, consts = nnx.split(
        model, nnx.Param, StepState, ...)
    self.tx = optimizer_lib.make_optimizer(config.optimizer)
    self.trainable = config.get("trainable")
    self.model_state = model_state
    abstract = jax.eval_shape(self._init_state, params)
    self.state_shardings = sharding.param_shardings(abstract, self.mesh)
    self.init_state = jax.jit(self._init_state,
                              out_shardings=self.state_shardings)
    self.params = params
    self.consts = jax.device_put(consts,
                                 sharding.replicated(consts, self.mesh))
    self.train_step = _MeshJit(jax.jit(
        functools.partial(train_step, self.graphdef, self.tx, self.task,
                          trainable=self.trainable),
        donate_argnums=(0,), out_shardings=(self.state_shardings, None)),
                               self.mesh)
    self.eval_step = _MeshJit(jax.jit(
        functools.partial(_eval_step, self.graphdef, self.task)), self.mesh)

  def _init_state(self, params):
    return init_state(self.tx, params, self.model_state, self.trainable)

  def iterator(self, split: str, *, batch_size: int, num_epochs=None):
    """This process's shard of a data split, as a grain iterator."""
    if batch_size % jax.process_count():
      raise ValueError(f"batch_size={batch_size} must divide over "
                       f"{jax.process_count()} processes")
    return data.make_iterator(
        self.config.data, split, batch_size=batch_size // jax.process_count(),
        seq_len=self.config.seq_len, seed=self.config.seed,
        shard_index=jax.process_index(), shard_count=jax.process_count(),
        num_epochs=num_epochs)

  def evaluate(self, params, model_state=None) -> dict:
    """Eval metrics over `config.eval_steps` batches of the eval split
    (model_state: the train state's, default the initial one)."""
    sums = None
    model_state = self.model_state if model_state is None else model_state
    eval_it = self.iterator("eval", batch_size=self.config.eval_batch_size)
    for _, batch in zip(range(self.config.eval_steps), eval_it):
      out = self.eval_step(params, (self.consts, model_state),
                           sharding.shard_batch(batch, self.mesh))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    if sums is None:
      raise ValueError(f"the eval split of {self.config.data.name!r} has "
                       "fewer examples than eval_batch_size="
                       f"{self.config.eval_batch_size}")
    return {k: float(v) for k, v in
            self.task.finalize(jax.device_get(sums)).items()}


class _MeshJit:
  """A jitted function traced, lowered and run with its mesh in context
  (`jax.set_mesh`), so the attention kernels run per shard
  (sparsejax.parallel) instead of on gathered inputs."""

  def __init__(self, jitted, mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args, **kwargs)

  def trace(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted.trace(*args, **kwargs)


# ----------------------------------------------------------------------------
# Pure step functions.
# ----------------------------------------------------------------------------


def _forward_sums(graphdef, task, params, consts, batch):
  """consts: a State, or a tuple of States (consts, model_state)."""
  consts = consts if isinstance(consts, tuple) else (consts,)
  model = nnx.merge(graphdef, params, *consts)
  return task.metric_sums(
      model(task.inputs(batch), **task.model_kwargs(batch)), batch)


def _split_trainable(params, trainable: Optional[str]):
  """(trained, frozen) params: paths matching the `trainable` regex train."""
  if not trainable:
    return params, None
  rx = re.compile(trainable)
  match = lambda path, _: bool(rx.search("/".join(map(str, path))))
  trained, frozen = nnx.split_state(params, match, ...)
  if not jax.tree.leaves(trained):
    raise ValueError(f"trainable={trainable!r} matches no parameter path")
  return trained, frozen


def init_state(tx, params, model_state=None, trainable=None):
  """The train state: step counter, params, optimizer state (of the
  trainable params) and the model's StepState variables."""
  trained, _ = _split_trainable(params, trainable)
  return dict(step=jnp.zeros((), jnp.int32), params=params,
              opt_state=tx.init(trained),
              model_state=nnx.State({}) if model_state is None
              else model_state)


def train_step(graphdef, tx, task, state, consts, batch, *, trainable=None):
  """One AdamW step; returns the new state and scalar metrics.

  Pure: jit it with `functools.partial(train_step, graphdef, tx, task)`.
  Params do not depend on the sequence length (RoPE), so one state can step
  through models of several lengths (a graphdef and consts per length).
  The loss is the task loss plus every `AuxLoss` value; the `StepState`
  variables the forward updated become the new state's model_state.
  `trainable` (a path regex) restricts the gradient and the update to the
  matching params (the others stay frozen and cost no backward pass).
  """
  # A graphdef split without StepState (e.g. needle_long's) carries the
  # initial StepState in consts: take it from there until the state has one.
  initial, consts = nnx.split_state(consts, StepState, ...)
  model_state = state.get("model_state") or initial
  trained, frozen = _split_trainable(state["params"], trainable)

  def loss_fn(trained):
    params = trained if frozen is None else nnx.merge_state(trained, frozen)
    # Fresh Variables at this trace level, so the forward may write its
    # StepState and AuxLoss values (nnx forbids writes across levels).
    fresh = lambda tree: jax.tree.map(lambda x: x, tree)
    model = nnx.merge(graphdef, params, fresh(consts), fresh(model_state))
    sums = task.metric_sums(
        model(task.inputs(batch), **task.model_kwargs(batch)), batch)
    loss = sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)
    aux = sum(jnp.sum(x) for x in jax.tree.leaves(nnx.state(model, AuxLoss)))
    new_model_state = jax.lax.stop_gradient(nnx.state(model, StepState))
    return loss + aux, (loss, aux, new_model_state)

  (_, (loss, aux, new_model_state)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(trained)
  updates, opt_state = tx.update(grads, state["opt_state"], trained)
  trained = optax.apply_updates(trained, updates)
  params = trained if frozen is None else nnx.merge_state(trained, frozen)
  new_state = dict(step=state["step"] + 1, params=params, opt_state=opt_state,
                   model_state=new_model_state)
  return new_state, dict(loss=loss, aux_loss=jnp.asarray(aux, jnp.float32),
                         grad_norm=optax.tree.norm(grads),
                         param_norm=optax.tree.norm(params),
                         update_norm=optax.tree.norm(updates))


def _eval_step(graphdef, task, params, consts, batch):
  return _forward_sums(graphdef, task, params, consts, batch)


# ----------------------------------------------------------------------------
# Loops.
# ----------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str, *, max_steps: Optional[int] = None,
                       devices=None) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  Args:
    config: experiment ConfigDict (see configs/lm.py).
    workdir: checkpoints go to workdir/checkpoints, TensorBoard to workdir/tb.
    max_steps: stop (with a checkpoint) after this global step, as a
      preempted job would; the schedule still follows num_train_steps.
    devices: devices for the mesh (default: all).

  Returns:
    dict(eval=final eval metrics, history=[(step, train loss)] at log steps,
    step=last step).
  """
  exp = Experiment(config, devices)
  ckpt = checkpoints.Checkpointer(
      os.path.join(workdir, "checkpoints"), every=config.checkpoint.every,
      keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  train_it = exp.iterator("train", batch_size=config.batch_size)
  state = exp.init_state(exp.params)
  restored, step = ckpt.restore(state, train_it)
  if restored is None and config.get("init_from"):
    state["params"] = checkpoints.restore_matching(
        state["params"], os.path.join(config.init_from, "checkpoints"))
  state, step = (restored, step) if restored is not None else (state, 0)
  if restored is not None:
    # WARNING: visible under the main job's default verbosity.
    logging.warning("resumed from step %d (%s)", step, ckpt.directory)
  total = config.num_train_steps
  last = total if max_steps is None else min(total, max_steps)

  writer = metrics_lib.Writer(workdir, total_steps=total, start_step=step,
                              progress_bar=config.progress_bar)
  timer = metrics_lib.StepTimer(
      config.batch_size * exp.tokens_per_example, exp.flops_per_token,
      metrics_lib.peak_flops(config.get("peak_flops")), exp.mesh.size)
  timer.reset(step)
  history, eval_metrics = [], {}
  while step < last:
    batch = sharding.shard_batch(next(train_it), exp.mesh)
    state, step_metrics = exp.train_step(state, exp.consts, batch)
    step += 1
    must_save = step % config.checkpoint.every == 0 or step == last
    if step % config.log_every == 0 or must_save:
      # device_get only here: it syncs the host with the device.
      values = jax.device_get(step_metrics)
      metrics_lib.check_finite(step, values)  # before saving NaNs
      values.update(timer.measure(step))
      history.append((step, float(values["loss"])))
      writer.write(step, values, prefix="train/")
      writer.progress(step, dict(loss=values["loss"],
                                 tok_s=values["tokens_per_s"]))
    if step % config.eval_every == 0 or step == total:
      eval_metrics = exp.evaluate(state["params"], state["model_state"])
      writer.write(step, eval_metrics, prefix="eval/")
      timer.reset(step)  # eval time is not step time
    ckpt.save(step, state, train_it, force=step == last)
  ckpt.wait()
  ckpt.close()
  writer.close()
  if not eval_metrics:  # e.g. resumed at the end, or stopped early
    eval_metrics = exp.evaluate(state["params"], state["model_state"])
  logging.info("final eval at step %d: %s", step, eval_metrics)
  return dict(eval=eval_metrics, history=history, step=step)


def restore_state(exp: "Experiment", workdir: str,
                  step: Optional[int] = None):
  """(state, step) of the checkpoint at `step` (default: latest) in workdir,
  placed with the experiment's shardings; FileNotFoundError if none."""
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  every=1, keep=None)
  template = jax.eval_shape(exp.init_state, exp.params)
  template = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      template, exp.state_shardings)
  state, step = ckpt.restore(template, step=step)
  ckpt.close()
  if state is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  return state, step


def evaluate(config, workdir: str, *, step: Optional[int] = None,
             devices=None) -> dict[str, float]:
  """Eval metrics of the checkpoint at `step` (default: latest) in workdir."""
  exp = Experiment(config, devices)
  state, step = restore_state(exp, workdir, step)
  return dict(step=step, **exp.evaluate(state["params"],
                                        state["model_state"]))
