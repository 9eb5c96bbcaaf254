"""Training and evaluation: `train_and_evaluate(config, workdir)`.

The model is an NNX module split once into (graphdef, params, consts);
the step is a pure function of arrays, `jax.jit`ted with donated state and
explicit shardings. consts holds the static attention masks (never
differentiated, never donated, never checkpointed).
"""

import functools
import os
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparsejax import data
from sparsejax import nn
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
    self.info = data.task_info(config.data)
    self.task = tasks.get_task(self.info["kind"])
    model = nn.build_model(config, self.info, seed=config.seed)
    self.flops_per_token = model.flops_per_token()
    self.tokens_per_example = model.seq_len
    self.graphdef, params, consts = nnx.split(model, nnx.Param, ...)
    self.tx = optimizer_lib.make_optimizer(config.optimizer)
    abstract = jax.eval_shape(self._init_state, params)
    self.state_shardings = sharding.param_shardings(abstract, self.mesh)
    self.init_state = jax.jit(self._init_state,
                              out_shardings=self.state_shardings)
    self.params = params
    self.consts = jax.device_put(consts,
                                 sharding.replicated(consts, self.mesh))
    self.train_step = jax.jit(
        functools.partial(train_step, self.graphdef, self.tx, self.task),
        donate_argnums=(0,), out_shardings=(self.state_shardings, None))
    self.eval_step = jax.jit(
        functools.partial(_eval_step, self.graphdef, self.task))

  def _init_state(self, params):
    return init_state(self.tx, params)

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

  def evaluate(self, params) -> dict:
    """Eval metrics over `config.eval_steps` batches of the eval split."""
    sums = None
    eval_it = self.iterator("eval", batch_size=self.config.eval_batch_size)
    for _, batch in zip(range(self.config.eval_steps), eval_it):
      out = self.eval_step(params, self.consts,
                           sharding.shard_batch(batch, self.mesh))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    if sums is None:
      raise ValueError(f"the eval split of {self.config.data.name!r} has "
                       "fewer examples than eval_batch_size="
                       f"{self.config.eval_batch_size}")
    return {k: float(v) for k, v in
            self.task.finalize(jax.device_get(sums)).items()}


# ----------------------------------------------------------------------------
# Pure step functions.
# ----------------------------------------------------------------------------


def _forward_sums(graphdef, task, params, consts, batch):
  model = nnx.merge(graphdef, params, consts)
  return task.metric_sums(model(task.inputs(batch)), batch)


def init_state(tx, params):
  """The train state: step counter, params and optimizer state."""
  return dict(step=jnp.zeros((), jnp.int32), params=params,
              opt_state=tx.init(params))


def train_step(graphdef, tx, task, state, consts, batch):
  """One AdamW step; returns the new state and scalar metrics.

  Pure: jit it with `functools.partial(train_step, graphdef, tx, task)`.
  Params do not depend on the sequence length (RoPE), so one state can step
  through models of several lengths (a graphdef and consts per length).
  """

  def loss_fn(params):
    sums = _forward_sums(graphdef, task, params, consts, batch)
    return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new_state = dict(step=state["step"] + 1, params=params, opt_state=opt_state)
  return new_state, dict(loss=loss, grad_norm=optax.tree.norm(grads),
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
  state, step = (restored, step) if restored is not None else (state, 0)
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
      eval_metrics = exp.evaluate(state["params"])
      writer.write(step, eval_metrics, prefix="eval/")
      timer.reset(step)  # eval time is not step time
    ckpt.save(step, state, train_it, force=step == last)
  ckpt.wait()
  ckpt.close()
  writer.close()
  if not eval_metrics:  # e.g. resumed at the end, or stopped early
    eval_metrics = exp.evaluate(state["params"])
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
  return dict(step=step, **exp.evaluate(state["params"]))
