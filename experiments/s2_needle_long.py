r"""Needle retrieval at 2K-32K: dense vs S2-hybrid trained on long contexts.

  # one H200, under 7 minutes with compiles (see sparsejax/evals/needle_long.py)
  python -m experiments.s2_needle_long --preset=gpu --out_dir=$OUT/needle
  # the same code path on 2 CPU cores in about a minute
  python -m experiments.s2_needle_long --preset=smoke --out_dir=/tmp/needle
  # redraw the plots from the JSON in out_dir
  python -m experiments.s2_needle_long --plot_only --out_dir=/tmp/needle
"""

import time

_START = time.time()  # the time budget counts imports and JAX start-up

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses

from absl import app
from absl import flags
from absl import logging

from configs import lm
from sparsejax.evals import needle_long

_PRESET = flags.DEFINE_enum("preset", "smoke", sorted(needle_long.PRESETS),
                            "Model size, schedule and time budget.")
_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/needle_long",
                               "Where the JSON and plots go.")
_MAX_MINUTES = flags.DEFINE_float(
    "max_minutes", None, "Wall budget of the whole run (default: preset's); "
    "training stops early to keep evaluation inside it.")
_STEPS = flags.DEFINE_integer("steps", None, "Override the training steps.")
_PLOT_ONLY = flags.DEFINE_bool("plot_only", False,
                               "Only redraw the plots from out_dir's JSON.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if _PLOT_ONLY.value:
    print(needle_long.plot(_OUT_DIR.value))
    return
  preset = needle_long.PRESETS[_PRESET.value]
  overrides = {k: v for k, v in (("max_minutes", _MAX_MINUTES.value),
                                 ("steps", _STEPS.value)) if v is not None}
  preset = dataclasses.replace(preset, **overrides)
  needle_long.run(lm.get_config, preset, _OUT_DIR.value, start_time=_START)


if __name__ == "__main__":
  app.run(main)
