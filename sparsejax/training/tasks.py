"""Per task kind: model input from a batch, and the loss and metrics.

Keyed by `data.task_info(cfg)["kind"]`. Each returns sums (not means) so
that eval can add them over batches and devices before dividing.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Task:
  inputs: Callable[[dict], jax.Array]
  # (logits, batch) -> dict of metric sums, with "loss_sum" and "count".
  metric_sums: Callable[[jax.Array, dict], dict]
  # Named eval metrics from summed metrics.
  finalize: Callable[[dict], dict]
  # Extra keyword arguments of the model call (packed documents).
  model_kwargs: Callable[[dict], dict] = lambda batch: {}


def _lm_kwargs(batch):
  """segment_ids / positions of packed documents, when the batch has them."""
  return {k: batch[k] for k in ("segment_ids", "positions") if k in batch}


def _lm_sums(logits, batch):
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["targets"])
  weights = batch.get("loss_mask", jnp.ones_like(loss)).astype(jnp.float32)
  correct = (logits.argmax(-1) == batch["targets"]) * weights
  return dict(loss_sum=(loss * weights).sum(), count=weights.sum(),
              correct=correct.sum())


def _cls_sums(logits, batch):
  loss = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         batch["label"])
  return dict(loss_sum=loss.sum(), count=jnp.float32(loss.size),
              correct=(logits.argmax(-1) == batch["label"]).sum())


def _lm_finalize(sums):
  loss = sums["loss_sum"] / max(sums["count"], 1.0)
  return dict(loss=loss, perplexity=float(jnp.exp(loss)),
              accuracy=sums["correct"] / max(sums["count"], 1.0))


def _cls_finalize(sums):
  return dict(loss=sums["loss_sum"] / max(sums["count"], 1.0),
              accuracy=sums["correct"] / max(sums["count"], 1.0))


TASKS = {
    "lm": Task(lambda b: b["inputs"], _lm_sums, _lm_finalize, _lm_kwargs),
    "seq_cls": Task(lambda b: b["inputs"], _cls_sums, _cls_finalize),
    "image_cls": Task(lambda b: b["image"], _cls_sums, _cls_finalize),
}


def get_task(kind: str) -> Task:
  if kind not in TASKS:
    raise ValueError(f"unknown task kind {kind!r}; valid: {sorted(TASKS)}")
  return TASKS[kind]
