r"""Scatterbrain evidence: approximation error at equal budget, drop-in
evaluation of dense-trained models, training from scratch (issue #13).

  python -m experiments.scatterbrain_eval --preset=cpu \
      --workdir=/tmp/sb_eval --out_dir=benchmarks/scatterbrain/quality
  python -m experiments.scatterbrain_eval --preset=smoke \
      --workdir=/tmp/sb_smoke --out_dir=/tmp/sb_smoke/out
  # redraw the plots and tables from the JSON in out_dir
  python -m experiments.scatterbrain_eval --plot_only \
      --out_dir=benchmarks/scatterbrain/quality
"""

import os

from absl import app
from absl import flags
from absl import logging

from configs import lm
from configs import vit
from sparsejax.evals import compare
from sparsejax.evals import scatterbrain_eval

_PRESET = flags.DEFINE_enum("preset", "cpu", sorted(scatterbrain_eval.PRESETS),
                            "Sizes and steps.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/scatterbrain_eval",
                               "Run directories (checkpoints, TensorBoard).")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks/scatterbrain/quality",
                               "Where the JSON, tables and plots go.")
_PLOT_ONLY = flags.DEFINE_bool("plot_only", False,
                               "Only redraw from out_dir's JSON.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax is chatty at INFO
    logging.set_verbosity(logging.WARNING)
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  path = os.path.join(_OUT_DIR.value, scatterbrain_eval.JSON_NAME)
  if _PLOT_ONLY.value:
    out = compare.load_json(path)
  else:
    out = scatterbrain_eval.run(lm.get_config, vit.get_config,
                                scatterbrain_eval.PRESETS[_PRESET.value],
                                _WORKDIR.value, _OUT_DIR.value)
  table = scatterbrain_eval.tables(out)
  with open(os.path.join(_OUT_DIR.value, "tables.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  print("\n".join(scatterbrain_eval.plot(out, _OUT_DIR.value)))
  print(f"wall time {out['wall_s']:.0f} s")


if __name__ == "__main__":
  app.run(main)
