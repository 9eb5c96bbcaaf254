"""make_iterator / task_info: config -> grain DataLoader over TFDS sources."""

from typing import Any

import grain

from sparsejax.data import builder_base
from sparsejax.data import digits
from sparsejax.data import listops
from sparsejax.data import mqar
from sparsejax.data import needle
from sparsejax.data import pathfinder
from sparsejax.data import text_corpus
from sparsejax.data import tfds_source
from sparsejax.data import transforms

TFDS_PREFIX = "tfds:"
_BUILDERS = {"mqar": mqar.SjMqar, "needle": needle.SjNeedle,
             "listops": listops.SjListops, "pathfinder": pathfinder.SjPathfinder,
             "digits": digits.SjDigits}
NAMES = ("text_corpus", "mqar", "needle", "listops", "pathfinder", "digits")
# cfg key -> builder param shared by all synthetic tasks.
_COMMON_KEYS = {"num_examples": "num_train", "num_eval_examples": "num_eval",
                "data_seed": "seed"}


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  """cfg.key, or `default` if missing or None (ConfigDict or any object)."""
  value = getattr(cfg, key, None)
  return default if value is None else value


def _check_name(name: str) -> None:
  if name in NAMES or (name.startswith(TFDS_PREFIX) and
                       len(name) > len(TFDS_PREFIX)):
    return
  raise ValueError(f"Unknown dataset name {name!r}; valid names: "
                   f"{', '.join(NAMES)}, or 'tfds:<name>' for a prepared "
                   "TFDS dataset (e.g. 'tfds:cifar10', 'tfds:lm1b').")


def _synthetic_builder(cfg, seq_len):
  cls = _BUILDERS[cfg.name]
  params = {}
  if "seq_len" in cls.DEFAULTS:
    params["seq_len"] = seq_len
  if cfg.name == "mqar":  # the default must fit short sequences too
    params["num_kv_pairs"] = min(cls.DEFAULTS["num_kv_pairs"],
                                 (seq_len + 1) // 4)
  for key in cls.DEFAULTS:
    if key not in ("seq_len", "num_train", "num_eval", "seed"):
      params[key] = _get(cfg, key, params.get(key, cls.DEFAULTS[key]))
  for key, param in _COMMON_KEYS.items():
    params[param] = _get(cfg, key, cls.DEFAULTS[param])
  return cls.with_params(_get(cfg, "data_dir"), **params)


def _tfds_split(split: str, b) -> str:
  if split == "train":
    return "train"
  if split == "eval":
    return tfds_source.eval_split(b)
  raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def _source_and_ops(cfg, split: str, seq_len: int):
  """The random-access source and per-record transforms for `cfg.name`."""
  name = cfg.name
  data_dir = _get(cfg, "data_dir")
  if name == "text_corpus":
    b = builder_base.prepare(text_corpus.SjTextCorpus.with_params(
        data_dir, root=_get(cfg, "root"), pattern=_get(cfg, "pattern"),
        max_bytes=_get(cfg, "max_bytes")))
    blocks = b.as_data_source(_tfds_split(split, b))
    return text_corpus.ByteChunks(blocks, seq_len,
                                  pack=_get(cfg, "pack", False)), []
  if name in _BUILDERS:
    b = builder_base.prepare(_synthetic_builder(cfg, seq_len))
    kind = tfds_source.kind(b)
  else:
    b = tfds_source.prepared_builder(name[len(TFDS_PREFIX):], data_dir)
    kind = tfds_source.kind(b)
  source = b.as_data_source(_tfds_split(split, b))
  if kind == "image_cls":
    shape = b.info.features["image"].shape
    size = None if None not in shape[:2] else _get(cfg, "image_size", 224)
    return source, [transforms.ImageFields(size)]
  ops = {"lm": transforms.LmFields, "lm_text": transforms.TextToBytes,
         "seq_cls": transforms.SeqClsFields}[kind]
  return source, [ops(seq_len)]


def make_iterator(cfg: Any, split: str = "train", *, batch_size: int,
                  seq_len: int, seed: int = 0, shard_index: int = 0,
                  shard_count: int = 1, num_epochs: int | None = None):
  """A grain DataLoader iterator of batched numpy dicts for `cfg.name`.

  Args:
    cfg: attribute object (e.g. ConfigDict) with `name` (one of NAMES or
      "tfds:<name>") and `data_dir` (None: $SPARSEJAX_DATA_DIR or
      ~/.cache/sparsejax/tfds); optional task keys (see the package doc).
    split: "train" (shuffled, repeats forever by default) or "eval" (in
      order, one epoch by default).
    batch_size: per-shard batch size; a final partial batch is dropped.
    seq_len: sequence length of LM / sequence tasks (ignored for images).
    seed: shuffle seed (the data themselves depend on cfg.data_seed).
    shard_index: this host's shard, e.g. jax.process_index().
    shard_count: number of shards, e.g. jax.process_count().
    num_epochs: None for the split's default, else that many epochs.

  Returns:
    An iterator with get_state()/set_state() (see the package doc for orbax).
  """
  _check_name(cfg.name)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} not in [0, {shard_count})")
  source, ops = _source_and_ops(cfg, split, seq_len)
  train = split == "train"
  if num_epochs is None and not train:
    num_epochs = 1
  sampler = grain.samplers.IndexSampler(
      num_records=len(source),
      shard_options=grain.sharding.ShardOptions(
          shard_index=shard_index, shard_count=shard_count,
          drop_remainder=True),
      shuffle=train, num_epochs=num_epochs, seed=seed)
  loader = grain.DataLoader(
      data_source=source, sampler=sampler,
      operations=[*ops, grain.transforms.Batch(batch_size,
                                               drop_remainder=True)],
      worker_count=_get(cfg, "worker_count", 0),
      read_options=grain.ReadOptions(
          num_threads=_get(cfg, "read_threads", 2), prefetch_buffer_size=64))
  return iter(loader)


def task_info(cfg: Any) -> dict[str, Any]:
  """vocab_size, num_classes, kind ("lm"|"seq_cls"|"image_cls"), image_shape.

  Unset entries are None. For "tfds:<name>" the builder's metadata is read
  (registered builders need not be prepared).
  """
  _check_name(cfg.name)
  info = dict(vocab_size=None, num_classes=None, kind="lm", image_shape=None)
  name = cfg.name
  if name in ("text_corpus", "needle"):
    info["vocab_size"] = 256
  elif name == "mqar":
    info["vocab_size"] = _get(cfg, "vocab_size",
                              mqar.SjMqar.DEFAULTS["vocab_size"])
  elif name == "listops":
    info.update(vocab_size=listops.VOCAB_SIZE, num_classes=listops.NUM_CLASSES,
                kind="seq_cls")
  elif name == "digits":
    s = 8 * _get(cfg, "upsample", 1)
    info.update(num_classes=10, kind="image_cls", image_shape=(s, s, 1))
  elif name == "pathfinder":
    s = _get(cfg, "image_size", pathfinder.SjPathfinder.DEFAULTS["image_size"])
    info.update(num_classes=2, kind="image_cls", image_shape=(s, s, 1))
  else:
    info.update(_tfds_info(cfg))
  return info


def _tfds_info(cfg) -> dict[str, Any]:
  b = tfds_source.builder(cfg.name[len(TFDS_PREFIX):], _get(cfg, "data_dir"))
  kind = tfds_source.kind(b)
  features = b.info.features
  num_classes = None
  if "label" in features and hasattr(features["label"], "num_classes"):
    num_classes = features["label"].num_classes
  if kind == "image_cls":
    shape = tuple(features["image"].shape)
    if None in shape[:2]:
      s = _get(cfg, "image_size", 224)
      shape = (s, s, shape[-1] or 3)
    return dict(kind=kind, num_classes=num_classes, image_shape=shape)
  if kind == "lm_text":
    return dict(kind="lm", vocab_size=256)
  return dict(kind=kind, num_classes=num_classes,
              vocab_size=_get(cfg, "vocab_size"))
