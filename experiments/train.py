r"""Trains a model from a config file; resumes from the workdir's checkpoint.

  python -m experiments.train --config=configs/lm.py --workdir=/tmp/sparsejax_lm
  python -m experiments.train --config=configs/lm.py:attention=dense \
      --config.num_train_steps=100 --workdir=/tmp/lm_dense
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sparsejax import training

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with :arg.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and TensorBoard.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax is chatty at INFO
    logging.set_verbosity(logging.WARNING)
  logging.info("config:\n%s", _CONFIG.value)
  result = training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  metrics = ", ".join(f"{k}={v:.4f}" for k, v in result["eval"].items())
  print(f"final eval (step {result['step']}): {metrics}")


if __name__ == "__main__":
  app.run(main)
