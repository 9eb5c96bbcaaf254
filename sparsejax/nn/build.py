"""Model construction from a config: a name -> builder registry."""

from typing import Any, Callable, Mapping

import jax.numpy as jnp
from flax import nnx

from sparsejax.nn import lm
from sparsejax.nn import maxvit
from sparsejax.nn import vit


def _lm(model: Mapping[str, Any], attention, info, seq_len, rngs, dtype):
  return lm.TransformerLM(vocab_size=info["vocab_size"], seq_len=seq_len,
                          attention=attention, rngs=rngs, dtype=dtype,
                          **model)


def _seq_cls(model: Mapping[str, Any], attention, info, seq_len, rngs, dtype):
  return lm.SequenceClassifier(vocab_size=info["vocab_size"],
                               num_classes=info["num_classes"],
                               seq_len=seq_len, attention=attention,
                               rngs=rngs, dtype=dtype, **model)


def _vit(model: Mapping[str, Any], attention, info, seq_len, rngs, dtype):
  del seq_len  # the image size fixes the token count
  return vit.ViT(image_shape=tuple(info["image_shape"]),
                 num_classes=info["num_classes"], attention=attention,
                 rngs=rngs, dtype=dtype, **model)


def _maxvit(model: Mapping[str, Any], attention, info, seq_len, rngs, dtype):
  del seq_len
  impl = (attention or {}).get("impl", "auto")
  return maxvit.MaxViT(image_shape=tuple(info["image_shape"]),
                       num_classes=info["num_classes"], impl=impl, rngs=rngs,
                       dtype=dtype, **model)


MODELS: dict[str, Callable[..., nnx.Module]] = {
    "lm": _lm, "seq_cls": _seq_cls, "vit": _vit, "maxvit": _maxvit}


def build_model(config, task_info: Mapping[str, Any], *, seed: int = 0):
  """Builds `config.model.name` with the task's vocab / classes / image shape.

  Args:
    config: the experiment ConfigDict (uses model, attention, seq_len, dtype).
    task_info: `sparsejax.data.task_info(config.data)`.
    seed: parameter init seed.
  """
  model = dict(config.model.to_dict() if hasattr(config.model, "to_dict")
               else config.model)
  name = model.pop("name")
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid: {sorted(MODELS)}")
  attention = (config.attention.to_dict()
               if hasattr(config.attention, "to_dict") else config.attention)
  return MODELS[name](model, attention, task_info, config.get("seq_len"),
                      nnx.Rngs(seed), jnp.dtype(config.get("dtype",
                                                           "float32")))
