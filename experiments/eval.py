r"""Evaluates a saved checkpoint and prints its eval metrics.

  python -m experiments.eval --config=configs/lm.py --workdir=/tmp/sparsejax_lm
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sparsejax import training

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The config the run was trained with.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax is chatty at INFO
    logging.set_verbosity(logging.WARNING)
  result = training.evaluate(_CONFIG.value, _WORKDIR.value, step=_STEP.value)
  step = result.pop("step")
  metrics = ", ".join(f"{k}={v:.4f}" for k, v in result.items())
  print(f"eval (checkpoint step {step}): {metrics}")


if __name__ == "__main__":
  app.run(main)
