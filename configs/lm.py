r"""Decoder-only LM on an offline text task, attention variant from the arg.

  python -m experiments.train --config=configs/lm.py --workdir=/tmp/lm
  python -m experiments.train --config=configs/lm.py:attention=dense,small \
      --workdir=/tmp/lm --config.num_train_steps=50

Arg keys: attention (a registered variant: dense, sliding_window, s2,
block_sparse, ...), small (a tiny smoke-test model), task (data.name:
text_corpus, mqar, needle; listops trains a bidirectional classifier).
The default is a small S2 LM that trains in a few minutes on 2 CPU cores.
"""

import ml_collections

from configs import common

# Per-variant options; the arg picks one (a lookup, not a branch per variant).
_ATTENTION_OPTIONS = {
    "dense": dict(block_size=32),
    "sliding_window": dict(window=64, block_size=32),
    # 2 kv heads -> 2 distinct S2 shards: vert_stride 2 covers the context.
    "s2": dict(block_size=32, local_blocks=2, vert_stride=2,
               num_dense_heads=0, homo_head=False, head_sliding_offset=0),
    "block_sparse": dict(block_size=32, pattern=None),
}


# Sequence-classification tasks use the bidirectional encoder.
_MODEL_FOR_TASK = {"listops": "seq_cls"}


def get_config(arg=None):
  """Returns the LM experiment config; see the module docstring for `arg`."""
  arg = common.parse_arg(arg, attention="s2", small=False, task="text_corpus")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dtype = "float32"
  config.seq_len = 64 if arg.small else 256
  config.batch_size = 8
  config.num_train_steps = 20 if arg.small else 400

  # max_bytes caps the text corpus (stdlib source) so building stays fast;
  # raise it for long-context runs that need more eval text.
  # pack: text_corpus chunks carry segment ids and per-document positions
  # (attention stays inside each file; no loss across a boundary).
  config.data = ml_collections.ConfigDict(dict(name=arg.task, data_dir=None,
                                               max_bytes=4_000_000,
                                               pack=False))

  config.model = ml_collections.ConfigDict(dict(
      name=_MODEL_FOR_TASK.get(arg.task, "lm"), d_model=32 if arg.small else 128,
      num_layers=2, num_heads=4, num_kv_heads=2,
      head_dim=ml_collections.config_dict.placeholder(int), rope_theta=1e4))
  # Derived: follows --config.model.d_model overrides.
  config.model.mlp_dim = config.model.get_ref("d_model") * 4

  options = dict(_ATTENTION_OPTIONS.get(
      arg.attention, common.default_options(arg.attention, block_size=32)))
  if arg.attention == "block_sparse":
    # Example pattern: a two-block local band plus the first (sink) column.
    nb = config.seq_len // options["block_size"]
    options["pattern"] = [[j == 0 or i - 1 <= j <= i for j in range(nb)]
                          for i in range(nb)]
  config.attention = common.attention_config(arg.attention, options)

  common.add_training_defaults(
      config, optimizer=dict(
          learning_rate=3e-3, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
          clip_norm=1.0, end_lr_factor=0.1),
      log_every=5 if arg.small else 20, eval_steps=2 if arg.small else 8)
  return config
