"""Needle retrieval: find a "key -> value" needle in a haystack of filler.

Layout of the `seq_len + 1` tokens (inputs = [:-1], targets = [1:]):

  filler ... NEEDLE key ARROW value ... filler ... QUERY key ARROW value

The needle starts at `depth` (a fraction of the haystack) and the query sits
at the very end; the loss mask covers only the answer (the final value
tokens), which can be read only by attending back to the needle. Vocabulary
(256): 0 pad, 1 NEEDLE, 2 ARROW, 3 QUERY, keys and values in [4, 256); filler
tokens in [4, 256) too, so only the markers make the needle findable.
Any length works (2K..32K and beyond): nothing is stored per length.
"""

import numpy as np

from sparsejax.data import builder_base

VOCAB_SIZE = 256
NEEDLE, ARROW, QUERY = 1, 2, 3
_FIRST_FREE = 4


def make_needle_example(rng: np.random.Generator, seq_len: int,
                        depth: float | None = None, *, key_len: int = 2,
                        value_len: int = 2) -> dict:
  """One needle example; `depth` in [0, 1] (None: uniform random).

  Returns the LM dict (inputs, targets int32[seq_len], loss_mask
  float32[seq_len]) plus "needle_pos" (index of the NEEDLE marker in inputs)
  and "value" (int32[value_len], the answer).
  """
  span = 2 + key_len + value_len  # marker, key, ARROW, value
  query_start = seq_len + 1 - span
  if query_start < span:
    raise ValueError(f"seq_len={seq_len} too short for a needle of {span}")
  if depth is None:
    depth = rng.random()
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1], got {depth}")
  seq = rng.integers(_FIRST_FREE, VOCAB_SIZE, size=seq_len + 1).astype(
      np.int32)
  key = rng.integers(_FIRST_FREE, VOCAB_SIZE, size=key_len)
  value = rng.integers(_FIRST_FREE, VOCAB_SIZE, size=value_len)
  needle = np.concatenate([[NEEDLE], key, [ARROW], value])
  pos = int(round(depth * (query_start - span)))
  seq[pos:pos + span] = needle
  seq[query_start:] = np.concatenate([[QUERY], key, [ARROW], value])
  loss_mask = np.zeros(seq_len, np.float32)
  loss_mask[seq_len - value_len:] = 1.0  # targets there are the value
  return {"inputs": seq[:-1], "targets": seq[1:], "loss_mask": loss_mask,
          "needle_pos": np.int32(pos), "value": value.astype(np.int32)}


def make_needle_batch(rng_seed: int, batch_size: int, seq_len: int,
                      depth_fraction: float | None, **kwargs) -> dict:
  """A batch of needle examples at a fixed depth (None: random per example).

  Example i draws from np.random.default_rng([rng_seed, i]), so a batch is a
  pure function of its arguments (no files, any length).

  Returns the LM dict (inputs, targets: int32[B, L]; loss_mask:
  float32[B, L] marking the answer tokens), plus needle_pos int32[B].
  """
  examples = [
      make_needle_example(np.random.default_rng([rng_seed, i]), seq_len,
                          depth_fraction, **kwargs)
      for i in range(batch_size)]
  keys = ("inputs", "targets", "loss_mask", "needle_pos")
  return {k: np.stack([e[k] for e in examples]) for k in keys}


class SjNeedle(builder_base.SyntheticBuilder):
  """TFDS builder for needle examples at random depths (training)."""

  name = "sj_needle"
  DEFAULTS = dict(seq_len=512, key_len=2, value_len=2, num_train=20000,
                  num_eval=1000, seed=0)

  def features(self):
    return builder_base.lm_features()

  @staticmethod
  def make_example(rng, *, seq_len, **params):
    ex = make_needle_example(rng, seq_len, None, **params)
    return {k: ex[k] for k in ("inputs", "targets", "loss_mask")}
