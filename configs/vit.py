r"""ViT image classification on synthetic Pathfinder or CIFAR-10.

  python -m experiments.train --config=configs/vit.py --workdir=/tmp/vit
  python -m experiments.train --config=configs/vit.py:task=tfds:cifar10 \
      --workdir=/tmp/vit_c10

Arg keys: attention (registered variant; non-causal), small (tiny smoke
test), task (data.name: pathfinder or tfds:cifar10).
"""

import ml_collections

from configs import common

_ATTENTION_OPTIONS = {
    "dense": dict(block_size=16),
    "sliding_window": dict(window=16, block_size=16),
    "s2": dict(block_size=16, local_blocks=1, vert_stride=2),
    "block_sparse": dict(block_size=16, pattern=None),
    # sj.vision layer variants, sized for an 8x8 token grid.
    "maxvit_block": dict(window=4, rel_bias=True),
    "maxvit_grid": dict(grid=4, rel_bias=True),
    "neighborhood": dict(kernel_size=3, dilation=1, rel_bias=True),
    "routing": dict(num_regions=2, topk=2, lepe_kernel=5,
                    biformer_scale=True),
}


def get_config(arg=None):
  """Returns the ViT experiment config; see the module docstring for `arg`."""
  arg = common.parse_arg(arg, attention="dense", small=False,
                         task="pathfinder")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dtype = "float32"
  config.seq_len = 0  # unused: the image size sets the token count
  config.batch_size = 16 if arg.small else 64
  config.num_train_steps = 10 if arg.small else 1000

  config.data = ml_collections.ConfigDict(dict(name=arg.task, data_dir=None))
  config.model = ml_collections.ConfigDict(dict(
      name="vit", patch_size=4, d_model=32 if arg.small else 128,
      num_layers=2 if arg.small else 4, num_heads=4, num_kv_heads=4,
      head_dim=ml_collections.config_dict.placeholder(int)))
  config.model.mlp_dim = config.model.get_ref("d_model") * 4

  options = dict(_ATTENTION_OPTIONS.get(
      arg.attention, common.default_options(arg.attention, block_size=16)))
  if arg.attention == "block_sparse":
    # Example pattern over 32x32 / patch 4 = 64 tokens (4 blocks): a band.
    options["pattern"] = [[abs(i - j) <= 1 for j in range(4)]
                          for i in range(4)]
  config.attention = common.attention_config(arg.attention, options)

  common.add_training_defaults(
      config, optimizer=dict(
          learning_rate=1e-3, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
          clip_norm=1.0, end_lr_factor=0.01),
      log_every=5 if arg.small else 50, eval_steps=2 if arg.small else 16)
  return config
