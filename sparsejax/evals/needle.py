"""Needle-in-a-haystack retrieval accuracy at any length and depth.

Needles come from `data.make_needle_batch` (generated on the fly, nothing is
stored per length). A prediction is an exact match when every answer token
(the value after `QUERY key ARROW`) is the argmax at its position. With
teacher forcing that equals greedy decoding of the answer: the second token
is only scored right if the first was.

  predict = needle.model_predict_fn(config, params, seq_len=8192)
  result = needle.needle_accuracy({8192: predict}, depths=[0.0, 0.5, 1.0])

A predict function maps inputs int32[B, L] to the predicted answer tokens
int32[B, value_len] (the argmax at the last value_len positions). A model
built at length N also predicts for every L <= N: the needle is padded at the
end, and causal attention keeps the padding out of the answer positions
(`predict_answers`), so one compiled length serves all shorter ones exactly.
"""

import copy
import functools
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import data
from sparsejax import nn
from sparsejax.data import needle as needle_data
from sparsejax.training import train

PredictFn = Callable[[np.ndarray], np.ndarray]

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def needle_accuracy(predict_fns: Mapping[int, PredictFn], *,
                    depths: Sequence[float] = DEFAULT_DEPTHS,
                    num_examples: int | Mapping[int, int] = 8,
                    batch_size: int = 4, seed: int = 0, key_len: int = 2,
                    value_len: int = 2) -> dict[str, Any]:
  """Exact-match retrieval accuracy per (length, depth).

  Args:
    predict_fns: {seq_len: predict function for that length}.
    depths: needle depths, fractions of the haystack in [0, 1].
    num_examples: needles per (length, depth), or {seq_len: count}.
    batch_size: needles per predict call.
    seed: base seed; cell (length, depth) uses its own stream, so results
      at one length do not depend on which other lengths are evaluated.
    key_len: needle key tokens.
    value_len: answer tokens.

  Returns:
    dict(accuracy={str(L): {str(depth): exact match in [0, 1]}},
    token_accuracy (same layout, per answer token), examples={str(L): n},
    seconds={str(L): wall time}, depths, lengths).
  """
  acc, tok_acc, examples, seconds = {}, {}, {}, {}
  for seq_len, predict in predict_fns.items():
    n = (num_examples[seq_len] if isinstance(num_examples, Mapping)
         else num_examples)
    start = time.perf_counter()
    acc[str(seq_len)], tok_acc[str(seq_len)] = {}, {}
    for di, depth in enumerate(depths):
      hits, tok_hits, done = 0.0, 0.0, 0
      while done < n:
        b = min(batch_size, n - done)
        batch = needle_data.make_needle_batch(
            seed * 1_000_003 + seq_len * 101 + di * 7 + done, b, seq_len,
            depth, key_len=key_len, value_len=value_len)
        answer = batch["targets"][:, -value_len:]
        pred = np.asarray(predict(batch["inputs"]))
        if pred.shape != answer.shape:
          raise ValueError(f"predict returned shape {pred.shape}, expected "
                           f"{answer.shape} (batch, value_len)")
        match = pred == answer
        hits += match.all(-1).sum()
        tok_hits += match.mean(-1).sum()
        done += b
      acc[str(seq_len)][str(depth)] = float(hits / n)
      tok_acc[str(seq_len)][str(depth)] = float(tok_hits / n)
    seconds[str(seq_len)] = time.perf_counter() - start
    examples[str(seq_len)] = n
  return dict(accuracy=acc, token_accuracy=tok_acc, examples=examples,
              seconds=seconds, depths=list(depths),
              lengths=[int(x) for x in predict_fns])


def oracle_predict(inputs: np.ndarray, *, key_len: int = 2,
                   value_len: int = 2) -> np.ndarray:
  """Reads the answer off the needle in `inputs`: a perfect retriever.

  For tests (the metric must reach 1.0) and as the upper bound.
  """
  inputs = np.asarray(inputs)
  pos = (inputs == needle_data.NEEDLE).argmax(-1)
  start = pos + 2 + key_len  # NEEDLE, key..., ARROW, value...
  idx = start[:, None] + np.arange(value_len)
  return np.take_along_axis(inputs, idx, axis=-1)


def with_seq_len(config, seq_len: int, *, impl: Optional[str] = None):
  """A copy of `config` at another sequence length (and attention impl)."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.seq_len = seq_len
    if impl is not None:
      config.attention.impl = impl
  return config


def load_params(config, workdir: str, *, step: Optional[int] = None):
  """The trained params of the run in workdir (latest or `step`)."""
  state, _ = train.restore_state(train.Experiment(config), workdir, step)
  return state["params"]


def predict_answers(graphdef, params, consts, inputs, ends, *,
                    value_len: int = 2):
  """Greedy answer tokens int32 [B, value_len] of a causal LM.

  inputs int32 [B, N]; ends int32 [B]: each row's true length. The answer is
  the argmax at ends - value_len .. ends - 1; tokens at or after `ends` (the
  padding) cannot reach those positions through causal attention. Pure: jit
  it with `functools.partial(predict_answers, graphdef, value_len=...)`.
  """
  logits = nnx.merge(graphdef, params, consts)(inputs)  # [B, N, vocab]
  idx = ends[:, None] - value_len + jnp.arange(value_len)
  picked = jnp.take_along_axis(logits, idx[:, :, None], axis=1)
  return picked.argmax(-1).astype(jnp.int32)


def pad_inputs(inputs: np.ndarray, seq_len: int,
               batch: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """Pads inputs [b, L] with zeros to [batch or b, seq_len]; returns
  (padded, ends) with ends = L for every row (zero rows are never read)."""
  b, length = inputs.shape
  batch = b if batch is None else batch
  if length > seq_len or b > batch:
    raise ValueError(f"inputs {inputs.shape} do not fit [{batch}, {seq_len}]")
  padded = np.zeros((batch, seq_len), np.int32)
  padded[:b, :length] = inputs
  return padded, np.full((batch,), length, np.int32)


def model_predict_fn(config, params, seq_len: int, *, impl: str = "xla",
                     value_len: int = 2) -> PredictFn:
  """A predict function running the model of `config` built at `seq_len`.

  The masks are rebuilt for `seq_len` (the config's attention schedule and
  options); the parameters do not depend on the length (RoPE positions).
  Inputs may be shorter than `seq_len` (padded, see `predict_answers`).
  """
  cfg = with_seq_len(config, seq_len, impl=impl)
  model = nn.build_model(cfg, data.task_info(cfg.data), seed=cfg.seed)
  graphdef, _, consts = nnx.split(model, nnx.Param, ...)
  predict = jax.jit(functools.partial(predict_answers, graphdef,
                                      value_len=value_len))

  def run(inputs):
    padded, ends = pad_inputs(np.asarray(inputs), seq_len)
    return np.asarray(predict(params, consts, padded, ends))

  return run
