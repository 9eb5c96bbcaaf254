r"""Needle retrieval: the lightning hybrid against dense (issue #12).

  # one H200, ~90 s with compiles: trained 64 -> 8K, evaluated 2K-16K
  python -m experiments.linear_needle --preset=gpu --out_dir=OUTDIR/needle
  # the code path on 2 CPU cores
  python -m experiments.linear_needle --preset=smoke --out_dir=/tmp/lneedle
"""

import time

_START = time.time()  # the time budget counts imports and JAX start-up

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging

from configs import lm
from sparsejax.linear import needle

_PRESET = flags.DEFINE_enum("preset", "smoke", sorted(needle.PRESETS),
                            "Model size, schedule and time budget.")
_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/linear_needle",
                               "Where the JSON and plots go.")
_EVERY = flags.DEFINE_integer("every", 2, "softmax every N-th layer of the "
                              "hybrid")
_MAX_MINUTES = flags.DEFINE_float("max_minutes", None,
                                  "Wall budget (default: the preset's).")
_STEPS = flags.DEFINE_integer("steps", None, "Override the training steps.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  overrides = {k: v for k, v in (("max_minutes", _MAX_MINUTES.value),
                                 ("steps", _STEPS.value)) if v is not None}
  needle.run(lm.get_config, _PRESET.value, _OUT_DIR.value,
             every=_EVERY.value, start_time=_START, **overrides)


if __name__ == "__main__":
  app.run(main)
