"""ListOps (LRA; Nangia & Bowman 2018): evaluate nested list operations.

An expression like `[MAX 2 9 [MIN 4 7 ] 0 ]` is tokenised one token per
symbol and the label is its value (0-9). Operators are MAX, MIN, MED (median,
truncated to int as in LRA's generator) and SM (sum mod 10). Trees follow
LRA's generator (a node is an operator with prob. 0.25, else a digit;
operators take 2..max_args arguments; depth <= max_depth; trees shorter than
min_len, default seq_len // 4, are redrawn like LRA's 500-of-2000 filter) but
grow within a token budget so every example fits `seq_len`.
Vocabulary: 0 pad, 1-10 digits 0-9, 11 [MAX, 12 [MIN, 13 [MED, 14 [SM, 15 ].
"""

import numpy as np
import tensorflow_datasets as tfds

from sparsejax.data import builder_base

VOCAB_SIZE = 16
NUM_CLASSES = 10
PAD, END = 0, 15
OPS = {11: "MAX", 12: "MIN", 13: "MED", 14: "SM"}
_OP_P = 0.25  # LRA's VALUE_P: P(node is an operator)


def apply_op(op: str, args: list[int]) -> int:
  """The value of operator `op` on digit arguments."""
  if op == "MAX":
    return max(args)
  if op == "MIN":
    return min(args)
  if op == "MED":
    return int(np.median(args))
  return sum(args) % 10


def _tree(rng, depth, budget, max_depth, max_args, force_op=False):
  """Returns (tokens, value) using at most `budget` tokens."""
  if (not force_op and (depth >= max_depth or rng.random() >= _OP_P)) or (
      budget < 4):
    v = int(rng.integers(10))
    return [v + 1], v
  op = int(rng.integers(11, 15))
  budget -= 2  # the operator and its END
  n = min(int(rng.integers(2, max_args + 1)), budget)
  tokens, values = [op], []
  for i in range(n):
    # Keep one token per remaining argument so the list always closes.
    sub_budget = budget - (n - 1 - i)
    sub, v = _tree(rng, depth + 1, sub_budget, max_depth, max_args)
    tokens += sub
    values.append(v)
    budget -= len(sub)
  return tokens + [END], apply_op(OPS[op], values)


def make_listops_example(rng: np.random.Generator, seq_len: int, *,
                         max_depth: int = 10, max_args: int = 10,
                         min_len: int | None = None) -> dict:
  """One example: inputs int32[seq_len] (0-padded) and label int32 in 0-9."""
  if seq_len < 4:
    raise ValueError(f"seq_len={seq_len} too short for ListOps")
  min_len = seq_len // 4 if min_len is None else min_len
  for _ in range(1000):  # redraw short trees; bounded for tiny max_depth
    tokens, value = _tree(rng, 1, seq_len, max_depth, max_args,
                          force_op=True)
    if len(tokens) >= min_len:
      break
  inputs = np.zeros(seq_len, np.int32)
  inputs[:len(tokens)] = tokens
  return {"inputs": inputs, "label": np.int32(value)}


def to_string(inputs: np.ndarray) -> str:
  """Human-readable form of a token sequence (padding dropped)."""
  names = {**{d + 1: str(d) for d in range(10)},
           **{k: "[" + v for k, v in OPS.items()}, END: "]"}
  return " ".join(names[int(t)] for t in inputs if t != PAD)


class SjListops(builder_base.SyntheticBuilder):
  """TFDS builder for ListOps (params: seq_len, max_depth, max_args, ...)."""

  name = "sj_listops"
  DEFAULTS = dict(seq_len=512, max_depth=10, max_args=10, min_len=None,
                  num_train=10000, num_eval=500, seed=0)

  def features(self):
    return tfds.features.FeaturesDict({
        "inputs": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "label": tfds.features.Scalar(dtype=np.int32)})

  @staticmethod
  def make_example(rng, *, seq_len, **params):
    return make_listops_example(rng, seq_len, **params)
