"""Packed documents end to end: segment ids and positions from the text
corpus, a model that keeps each document to itself, and a packed training
run that resumes (and says so)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax import data
from sparsejax import training
from sparsejax.data import text_corpus
from sparsejax.nn import lm
from tests.test_training import tiny_config


def test_document_fields():
  # Two files "ab\0" and "cde\0", then the start of a third: "f".
  tokens = np.array([97, 98, 0, 99, 100, 101, 0, 102])
  f = text_corpus.document_fields(tokens)
  np.testing.assert_array_equal(f["segment_ids"], [0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(f["positions"], [0, 1, 2, 0, 1, 2, 3])
  # Targets 99 (after the first separator) and 102 start new documents.
  np.testing.assert_array_equal(f["loss_mask"], [1, 1, 0, 1, 1, 1, 0])


def test_packed_iterator(tmp_path):
  root = tmp_path / "src"
  root.mkdir()
  for i in range(12):
    (root / f"m{i:02d}.py").write_text(f"x{i} = {'1' * (5 + 7 * i)}\n")
  cfg = tiny_config().data
  cfg.unlock()
  cfg.update(root=str(root), data_dir=str(tmp_path / "tfds"), pack=True)
  batch = next(data.make_iterator(cfg, "train", batch_size=2, seq_len=64))
  assert batch["segment_ids"].shape == batch["positions"].shape == (2, 64)
  for row in range(2):
    x, ids = batch["inputs"][row], batch["segment_ids"][row]
    assert (np.diff(ids) >= 0).all() and ids.max() >= 1  # several files
    # Each document but the first starts right after a 0 separator.
    starts = np.flatnonzero(np.diff(ids)) + 1
    assert (x[starts - 1] == 0).all()
    assert (batch["positions"][row][starts] == 0).all()
    np.testing.assert_array_equal(batch["loss_mask"][row][starts - 1], 0)


def test_lm_keeps_documents_apart():
  """A document's logits do not depend on what it is packed with."""
  config = tiny_config()
  model = lm.TransformerLM(
      vocab_size=256, seq_len=64, d_model=32, num_layers=1, num_heads=4,
      num_kv_heads=2, mlp_dim=64, attention=dict(config.attention),
      rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  doc = rng.integers(1, 256, 40)
  logits = []
  for prefix in (17, 24):  # the same document after different neighbours
    tokens = np.concatenate([rng.integers(1, 256, prefix), doc])[:64]
    tokens = np.pad(tokens, (0, 64 - tokens.size))
    ids = np.concatenate([np.zeros(prefix), np.ones(64 - prefix)])
    pos = np.where(ids == 0, np.arange(64), np.arange(64) - prefix)
    out = jax.jit(model)(jnp.asarray(tokens[None]),
                         jnp.asarray(ids[None], jnp.int32),
                         jnp.asarray(pos[None], jnp.int32))
    logits.append(np.asarray(out)[0, prefix:prefix + 40])
  np.testing.assert_allclose(logits[0], logits[1], atol=2e-5)


def test_packed_training_resumes_and_logs_it(tmp_path, caplog):
  config = tiny_config(**{"data.pack": True})
  first = training.train_and_evaluate(config, str(tmp_path), max_steps=3)
  assert first["step"] == 3
  with caplog.at_level(logging.WARNING):
    second = training.train_and_evaluate(config, str(tmp_path), max_steps=4)
  assert second["step"] == 4
  lines = [r.getMessage() for r in caplog.records if "resumed" in
           r.getMessage()]
  assert len(lines) == 1 and lines[0].startswith("resumed from step 3")
  assert np.isfinite(second["history"][-1][1])
