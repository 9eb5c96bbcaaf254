r"""Lightning hybrid LM vs softmax LM: eval loss at equal steps (issue #12).

  # CPU (about 10 minutes on 2 cores): softmax, 3:1 hybrid, pure lightning
  python -m experiments.linear_quality --preset=cpu \
      --workdir=/tmp/linq --out_dir=benchmarks/linear/quality_cpu
  # one H200 (<= 90 s): softmax vs the MiniMax 7:1 hybrid, 8 layers, bf16
  python -m experiments.linear_quality --preset=gpu \
      --workdir=/tmp/linq_gpu --out_dir=OUTDIR/quality

Writes linear_quality.json (after each variant) and linear_quality.png.
"""

from absl import app
from absl import flags
from absl import logging

from configs import lm
from sparsejax.linear import quality

_PRESET = flags.DEFINE_enum("preset", "cpu", sorted(quality.PRESETS),
                            "Model size, steps and variants.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/linear_quality",
                               "Run directories (checkpoints, TensorBoard).")
_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/linear_quality_out",
                               "Where the JSON and the plot go.")
_STEPS = flags.DEFINE_integer("steps", None, "Override the training steps.")
_VARIANTS = flags.DEFINE_list("variants", None,
                              "Subset of softmax, lightning_hybrid, "
                              "lightning (default: the preset's).")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax is chatty at INFO
    logging.set_verbosity(logging.WARNING)
  out = quality.run(lm.get_config, _PRESET.value, _WORKDIR.value,
                    _OUT_DIR.value, steps=_STEPS.value, names=_VARIANTS.value)
  for name, gap in out.get("gap_vs_softmax", {}).items():
    print(f"{name}: {100 * gap:+.2f}% eval loss vs softmax")


if __name__ == "__main__":
  app.run(main)
