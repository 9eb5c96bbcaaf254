r"""Vision attention variants on sklearn's digits: test accuracy (issue #11).

  # CPU, a few minutes on 2 idle cores: dense ViT, MaxViT block / grid,
  # neighborhood and routing ViTs, and the MaxViT model
  nice python -m experiments.vision_quality --preset=cpu \
      --workdir=/tmp/visq --out_dir=benchmarks/vision/quality_cpu

Writes vision_quality.json (after each variant) and vision_quality.png.
"""

from absl import app
from absl import flags
from absl import logging

from configs import maxvit
from configs import vit
from sparsejax.vision import quality

_PRESET = flags.DEFINE_enum("preset", "cpu", sorted(quality.PRESETS),
                            "Model size and steps.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/vision_quality",
                               "Run directories (checkpoints, TensorBoard).")
_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/vision_quality_out",
                               "Where the JSON and the plot go.")
_STEPS = flags.DEFINE_integer("steps", None, "Override the training steps.")
_VARIANTS = flags.DEFINE_list("variants", None,
                              f"Subset of {', '.join(quality.VARIANTS)}.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax is chatty at INFO
    logging.set_verbosity(logging.WARNING)
  out = quality.run({"vit": vit.get_config, "maxvit": maxvit.get_config},
                    _PRESET.value, _WORKDIR.value, _OUT_DIR.value,
                    steps=_STEPS.value, names=_VARIANTS.value)
  for name, r in out["runs"].items():
    print(f"{name:13s} test accuracy {r['eval']['accuracy']:.4f} "
          f"({r['wall_s']:.0f} s)")


if __name__ == "__main__":
  app.run(main)
