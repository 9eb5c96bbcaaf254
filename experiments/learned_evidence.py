r"""Quality evidence for SeerAttention, Routing Transformer and MInference.

  # one H200, about 2.5 minutes with compiles (benchmarks/learned/run_h200.sh)
  python -m experiments.learned_evidence --preset=gpu --out_dir=$OUT/quality
  # the same code path on 2 CPU cores
  python -m experiments.learned_evidence --preset=smoke --out_dir=/tmp/le

See sparsejax/evals/learned_evidence.py for what it trains and measures.
"""

import time

_START = time.time()  # the time budget counts imports and JAX start-up

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses

from absl import app
from absl import flags
from absl import logging

from configs import lm
from sparsejax.evals import learned_evidence

_PRESET = flags.DEFINE_enum("preset", "smoke",
                            sorted(learned_evidence.PRESETS),
                            "Sizes, schedule and time budget.")
_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/learned_evidence",
                               "Where the JSON, tables and plots go.")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", None,
                                  "Wall budget of the whole run.")
_STEPS = flags.DEFINE_integer("steps", None, "Override the training steps.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  preset = learned_evidence.PRESETS[_PRESET.value]
  overrides = {k: v for k, v in (("max_seconds", _MAX_SECONDS.value),
                                 ("steps", _STEPS.value)) if v is not None}
  preset = dataclasses.replace(preset, **overrides)
  learned_evidence.run(lm.get_config, preset, _OUT_DIR.value,
                       start_time=_START)


if __name__ == "__main__":
  app.run(main)
