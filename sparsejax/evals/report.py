"""Runs the S2 quality comparisons and writes their JSON and plots.

Each comparison writes `<out_dir>/<name>.json`; `plot_all` redraws every
plot from those files (so plots never need a rerun).
"""

import json
import os
import time
from typing import Any, Callable, Optional, Sequence

from sparsejax.evals import compare

LOSS_JSON = "loss_comparison.json"
NEEDLE_JSON = "needle.json"


def loss_comparison(get_config: Callable[[str], Any], workdir: str,
                    out_dir: str, *, steps: Optional[int] = None) -> dict:
  """dense / s2 / s2_hybrid on the text corpus; writes loss_comparison.json."""
  common = dict(compare.LOSS_COMMON)
  if steps:
    common.update(num_train_steps=steps, eval_every=max(steps // 4, 1))
  start = time.perf_counter()
  runs = compare.run_variants(get_config, compare.loss_variants(), workdir,
                              common=common)
  out = dict(runs=runs, gap_vs_dense=compare.relative_gap(runs),
             total_wall_s=time.perf_counter() - start)
  compare.save_json(out, os.path.join(out_dir, LOSS_JSON))
  for name, r in runs.items():
    print(f"{name}: eval loss {r['eval']['loss']:.4f} "
          f"({100 * out['gap_vs_dense'][name]:+.2f}% vs dense), "
          f"{r['wall_s']:.0f} s")
  return out


def needle_comparison(*args, **kwargs):
  raise NotImplementedError


def _load(out_dir: str, name: str):
  path = os.path.join(out_dir, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def plot_all(out_dir: str) -> list[str]:
  """Draws every plot whose JSON exists in out_dir; returns the paths."""
  from sparsejax.evals import plots  # matplotlib only when plotting
  paths = []
  loss = _load(out_dir, LOSS_JSON)
  if loss:
    paths.append(plots.loss_curves(loss["runs"],
                                   os.path.join(out_dir, "loss_curves.png")))
  needle = _load(out_dir, NEEDLE_JSON)
  if needle:
    paths.append(plots.needle_heatmaps(
        needle, os.path.join(out_dir, "needle_accuracy.png")))
  return paths
