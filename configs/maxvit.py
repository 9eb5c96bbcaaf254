r"""MaxViT image classification (sj.vision block + grid attention).

  python -m experiments.train --config=configs/maxvit.py:small \
      --workdir=/tmp/maxvit_digits        # sklearn digits on CPU
  python -m experiments.train --config=configs/maxvit.py:task=tfds:imagenet2012 \
      --workdir=/tmp/maxvit_t             # MaxViT-T at 224 (prepared TFDS)

Arg keys: small (tiny model for sklearn's 8x8 digits), task (data.name),
impl (attention implementation).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, small=False, task="", impl="auto")
  task = arg.task or ("digits" if arg.small else "tfds:imagenet2012")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dtype = "float32" if arg.small else "bfloat16"
  config.seq_len = 0  # unused: the image size sets the token count
  config.batch_size = 64 if arg.small else 4096
  config.num_train_steps = 300 if arg.small else 93750  # 300 epochs @4096
  config.data = ml_collections.ConfigDict(dict(name=task, data_dir=None))
  if not task.startswith("tfds:"):
    config.data.upsample = 1
  else:
    config.data.image_size = 224
  if arg.small:  # 8x8 digits: 8x8 then 4x4 maps, window = grid = 4 then 2
    model = dict(widths=(32, 64), depths=(1, 1), stem_width=32, head_dim=16,
                 window=(4, 2), stem_stride=1, stage_strides=(1, 2))
  else:  # MaxViT-T (timm maxvit_tiny_tf_224 / google-research hp)
    model = dict(widths=(64, 128, 256, 512), depths=(2, 2, 5, 2),
                 stem_width=64, head_dim=32, window=7, stem_stride=2,
                 stage_strides=2)
  config.model = ml_collections.ConfigDict(dict(name="maxvit", **model))
  config.attention = common.attention_config("dense", {})
  config.attention.impl = arg.impl
  common.add_training_defaults(
      config, optimizer=dict(
          learning_rate=2e-3 if arg.small else 3e-3, weight_decay=0.05,
          b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0, end_lr_factor=0.01),
      log_every=10 if arg.small else 100, eval_steps=6 if arg.small else 50)
  return config
