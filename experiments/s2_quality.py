r"""S2-Attention quality evidence: loss comparison and needle retrieval.

  # dense vs s2 vs s2-hybrid LM loss on the local text corpus
  python -m experiments.s2_quality --which=loss \
      --workdir=/tmp/s2q/loss --out_dir=benchmarks/s2_quality
  # train dense and s2-hybrid on the needle task, evaluate at 2K..16K
  python -m experiments.s2_quality --which=needle \
      --workdir=/tmp/s2q/needle --out_dir=benchmarks/s2_quality
  # redraw the plots from the JSON in out_dir
  python -m experiments.s2_quality --which=plot --out_dir=benchmarks/s2_quality
"""

from absl import app
from absl import flags
from absl import logging

from configs import lm
from sparsejax.evals import report

_WHICH = flags.DEFINE_enum("which", "loss", ["loss", "needle", "plot"],
                           "Which evaluation to run.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/s2_quality",
                               "Run directories (checkpoints, TensorBoard).")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks/s2_quality",
                               "Where the JSON results and plots go.")
_STEPS = flags.DEFINE_integer("steps", None,
                              "Override the training steps (smoke runs).")
_LENGTHS = flags.DEFINE_list("lengths", None,
                             "Needle eval lengths (default: 2048,4096,8192).")
_EXAMPLES = flags.DEFINE_integer("examples", None,
                                 "Needle examples per (length, depth).")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax is chatty at INFO
    logging.set_verbosity(logging.WARNING)
  if _WHICH.value == "loss":
    report.loss_comparison(lm.get_config, _WORKDIR.value, _OUT_DIR.value,
                           steps=_STEPS.value)
  elif _WHICH.value == "needle":
    lengths = [int(x) for x in _LENGTHS.value] if _LENGTHS.value else None
    report.needle_comparison(lm.get_config, _WORKDIR.value, _OUT_DIR.value,
                             steps=_STEPS.value, lengths=lengths,
                             examples=_EXAMPLES.value)
  report.plot_all(_OUT_DIR.value)


if __name__ == "__main__":
  app.run(main)
