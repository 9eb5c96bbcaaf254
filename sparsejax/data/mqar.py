"""Multi-query associative recall (MQAR, Zoology; Arora et al. 2023).

The sequence starts with `num_kv_pairs` key-value pairs; the same pairs
reappear later, shuffled, as queries at random positions in an otherwise
zero-filled tail. The model is scored only on predicting each query's value.
Token 0 is filler; keys come from [1, vocab/2), values from [vocab/2, vocab).
"""

import numpy as np

from sparsejax.data import builder_base


def make_mqar_example(rng: np.random.Generator, seq_len: int, *,
                      num_kv_pairs: int, vocab_size: int = 8192) -> dict:
  """One MQAR example as an LM dict of length `seq_len` (numpy)."""
  k = num_kv_pairs
  half = vocab_size // 2
  if 4 * k > seq_len + 1 or half - 1 < k:
    raise ValueError(f"num_kv_pairs={k} does not fit seq_len={seq_len} / "
                     f"vocab_size={vocab_size}")
  keys = rng.choice(np.arange(1, half), size=k, replace=False)
  values = rng.integers(half, vocab_size, size=k)
  seq = np.zeros(seq_len + 1, np.int32)
  seq[0:2 * k:2], seq[1:2 * k:2] = keys, values
  # Queries occupy k distinct 2-token slots of the tail, in random order.
  num_slots = (seq_len + 1 - 2 * k) // 2
  slots = 2 * k + 2 * np.sort(rng.choice(num_slots, size=k, replace=False))
  order = rng.permutation(k)
  seq[slots], seq[slots + 1] = keys[order], values[order]
  loss_mask = np.zeros(seq_len, np.float32)
  loss_mask[slots] = 1.0  # input is a query key, target is its value
  return {"inputs": seq[:-1], "targets": seq[1:], "loss_mask": loss_mask}


class SjMqar(builder_base.SyntheticBuilder):
  """TFDS builder for MQAR examples (params: seq_len, num_kv_pairs, ...)."""

  name = "sj_mqar"
  DEFAULTS = dict(seq_len=256, num_kv_pairs=16, vocab_size=8192,
                  num_train=20000, num_eval=1000, seed=0)

  def features(self):
    return builder_base.lm_features()

  @staticmethod
  def make_example(rng, *, seq_len, **params):
    return make_mqar_example(rng, seq_len, **params)
