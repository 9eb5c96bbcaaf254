"""Byte-level text corpus from local files (default: this Python's stdlib).

The builder concatenates the files whose relative path matches a glob-like
pattern (fnmatch; a leading "**/" also matches top-level files), walked in
sorted order without site-packages, each followed by a 0 byte as a document
separator, into one byte stream per split and stores it
as fixed-size blocks, in order. ~5% of files (by a hash of their relative
path) form the eval split. `ByteChunks` then serves any `seq_len` from the
same files: chunk i is bytes [i*L, i*L + L + 1) -> inputs/targets, so every
byte is a target exactly once per epoch. With `pack=True` each chunk also
carries its documents' segment ids and per-document positions (for RoPE),
and the loss skips targets that start a new document (no training across
a boundary); the model keeps attention inside each document.
"""

import dataclasses
import fnmatch
import hashlib
import os
import pathlib
import sysconfig

import numpy as np
import tensorflow_datasets as tfds

from sparsejax.data import builder_base

VOCAB_SIZE = 256
BLOCK_SIZE = 4096
DEFAULT_MAX_BYTES = 4_000_000  # builds in about a second
_EVAL_EVERY = 20  # 1 in 20 files goes to eval
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def _is_eval(relpath: str) -> bool:
  digest = hashlib.sha1(relpath.encode()).digest()
  return int.from_bytes(digest[:4], "little") % _EVAL_EVERY == 0


def _walk(root: str, pattern: str):
  """Matching files in a fixed order; prunes installed packages and caches."""
  alt = pattern[3:] if pattern.startswith("**/") else pattern
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for f in sorted(filenames):
      rel = os.path.relpath(os.path.join(dirpath, f), root)
      if fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(rel, alt):
        yield rel


def list_files(root: str, pattern: str, max_bytes: int):
  """(train, eval) lists of paths, in walk order, capped at `max_bytes`."""
  train, evals, total = [], [], 0
  for rel in _walk(root, pattern):
    if total >= max_bytes:
      break
    path = pathlib.Path(root, rel)
    total += path.stat().st_size
    (evals if _is_eval(rel) else train).append(path)
  if not train:
    raise FileNotFoundError(f"No files match {pattern!r} under {root!r}")
  if not evals:  # tiny corpora: keep the eval split non-empty
    evals.append(train.pop())
  return train, evals


@dataclasses.dataclass(eq=False)
class TextCorpusConfig(tfds.core.BuilderConfig):
  root: str = ""
  pattern: str = "**/*.py"
  max_bytes: int = DEFAULT_MAX_BYTES


def make_config(root=None, pattern=None, max_bytes=None) -> TextCorpusConfig:
  """Config named by its parameters, so each setting is built once."""
  root = os.path.abspath(os.path.expanduser(root or stdlib_root()))
  pattern = pattern or "**/*.py"
  max_bytes = int(max_bytes or DEFAULT_MAX_BYTES)
  tag = hashlib.sha1(f"{root}|{pattern}".encode()).hexdigest()[:8]
  return TextCorpusConfig(name=f"files{tag}_max{max_bytes}", root=root,
                          pattern=pattern, max_bytes=max_bytes)


class SjTextCorpus(builder_base.SyntheticBuilder):
  """TFDS builder: blocks of the byte stream, feature "text" (bytes)."""

  name = "sj_text_corpus"

  @classmethod
  def with_params(cls, data_dir=None, **params):
    return cls(config=make_config(**params),
               data_dir=builder_base.default_data_dir(data_dir),
               file_format=builder_base.ARRAY_RECORD)

  def features(self):
    return tfds.features.FeaturesDict({"text": tfds.features.Text()})

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    train, evals = list_files(c.root, c.pattern, c.max_bytes)
    return {"train": self._generate_examples(train),
            "test": self._generate_examples(evals)}

  def _generate_examples(self, files):
    stream = b"".join(p.read_bytes() + b"\0" for p in files)
    for i in range(0, len(stream), BLOCK_SIZE):
      yield i // BLOCK_SIZE, {"text": stream[i:i + BLOCK_SIZE]}


def document_fields(tokens: np.ndarray) -> dict:
  """Segment ids, positions and loss mask of a chunk of seq_len + 1 tokens.

  A document is a file's bytes and its 0 separator, so a separator ends its
  document (predicting it is predicting the end). Ids count the separators
  before each input token; positions restart at each document; a target in
  another document than its input is masked.
  """
  ids = np.concatenate([[0], np.cumsum(tokens[:-1] == 0)]).astype(np.int32)
  n = len(tokens) - 1
  start = np.maximum.accumulate(np.where(
      np.concatenate([[True], ids[1:n] != ids[:n - 1]]), np.arange(n), 0))
  return {"segment_ids": ids[:-1],
          "positions": (np.arange(n) - start).astype(np.int32),
          "loss_mask": (ids[1:] == ids[:-1]).astype(np.float32)}


class ByteChunks:
  """Random-access source of LM examples cut from a stream of byte blocks.

  pack: also emit segment_ids / positions and mask cross-document targets
  (`document_fields`); False keeps one plain stream (attention crosses
  document boundaries).
  """

  def __init__(self, blocks, seq_len: int, pack: bool = False):
    self._blocks = blocks
    self._seq_len = seq_len
    self._pack = bool(pack)
    n = len(blocks)
    total = (n - 1) * BLOCK_SIZE + len(blocks[n - 1]["text"])
    self._len = (total - 1) // seq_len
    if self._len < 1:
      raise ValueError(f"Corpus of {total} bytes is shorter than seq_len")

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    start = int(index) * self._seq_len
    stop = start + self._seq_len + 1
    parts = [self._blocks[b]["text"]
             for b in range(start // BLOCK_SIZE, (stop - 1) // BLOCK_SIZE + 1)]
    offset = start - (start // BLOCK_SIZE) * BLOCK_SIZE
    data = b"".join(parts)[offset:offset + self._seq_len + 1]
    tokens = np.frombuffer(data, np.uint8).astype(np.int32)
    out = {"inputs": tokens[:-1], "targets": tokens[1:],
           "loss_mask": np.ones(self._seq_len, np.float32)}
    if self._pack:
      out.update(document_fields(tokens))
    return out

  def __repr__(self) -> str:
    return (f"ByteChunks(len={self._len}, seq_len={self._seq_len}, "
            f"pack={self._pack})")
