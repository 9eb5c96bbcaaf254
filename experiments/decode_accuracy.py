r"""Needle retrieval and answer loss of each decode method against dense.

  # one H200: trains a 4-layer needle LM for 40 s, then evaluates dense,
  # Quest, Double Sparsity, TidalDecode (128, 2K) and MoA at 8K-32K
  python -m experiments.decode_accuracy --preset=gpu --out_dir=$OUT/accuracy
  # the same code path on CPU in a few minutes
  python -m experiments.decode_accuracy --preset=smoke --out_dir=/tmp/acc
"""

import dataclasses

from absl import app
from absl import flags
from absl import logging

from configs import lm
from sparsejax.inference import accuracy

_PRESET = flags.DEFINE_enum("preset", "smoke", sorted(accuracy.PRESETS),
                            "Model, schedule and budgets.")
_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/decode_accuracy",
                               "Where the JSON and plot go.")
_TRAIN_SECONDS = flags.DEFINE_float("train_seconds", None,
                                    "Override the training budget.")
_EXAMPLES = flags.DEFINE_integer("examples", None,
                                 "Override needles per length.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  preset = accuracy.PRESETS[_PRESET.value]
  overrides = {k: v for k, v in (("train_seconds", _TRAIN_SECONDS.value),
                                 ("eval_examples", _EXAMPLES.value))
               if v is not None}
  accuracy.run(lm.get_config, dataclasses.replace(preset, **overrides),
               _OUT_DIR.value, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
  app.run(main)
