"""Runs the S2 quality comparisons and writes their JSON and plots.

Each comparison writes `<out_dir>/<name>.json`; `plot_all` redraws every
plot from those files (so plots never need a rerun).
"""

import json
import os
import time
from typing import Any, Callable, Optional, Sequence

from sparsejax.evals import compare
from sparsejax.evals import needle
from sparsejax.training import train

LOSS_JSON = "loss_comparison.json"
NEEDLE_JSON = "needle.json"

# Needle models: 4 layers, d_model 64, 4 q / 4 kv heads, trained at 256
# tokens with many needles per step (the loss covers only the 2 answer
# tokens of each sequence).
NEEDLE_COMMON = {
    "seq_len": 256,
    "batch_size": 32,
    "num_train_steps": 300,
    "model.num_layers": 4,
    "model.d_model": 64,
    "model.mlp_dim": 256,
    "model.num_heads": 4,
    "model.num_kv_heads": 4,
    "attention.impl": "xla",
    "log_every": 20,
    "eval_steps": 4,
    "progress_bar": False,
}
NEEDLE_LENGTHS = (2048, 4096, 8192, 16384)
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Needles per (length, depth); fewer at the longest (forward-only on CPU).
NEEDLE_EXAMPLES = {256: 16, 2048: 8, 4096: 8, 8192: 8, 16384: 4}


def needle_variants() -> list[compare.Variant]:
  """dense and s2_hybrid (odd layers dense) on the needle task."""
  s2 = {"attention.options": dict(compare.S2_OPTIONS)}
  return [
      compare.Variant("dense", "attention=dense,task=needle",
                      {"attention.options": dict(block_size=32)}),
      compare.Variant("s2_hybrid", "attention=s2,task=needle",
                      {**s2, "attention.dense_every_n": 2}),
  ]


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


def needle_comparison(get_config: Callable[[str], Any], workdir: str,
                      out_dir: str, *, steps: Optional[int] = None,
                      lengths: Optional[Sequence[int]] = None,
                      examples: Optional[int] = None) -> dict:
  """Trains dense and s2_hybrid on needles, evaluates long; needle.json.

  Models train at `NEEDLE_COMMON["seq_len"]` and are evaluated at the train
  length and at `lengths` (RoPE: the params do not depend on the length).
  """
  common = dict(NEEDLE_COMMON)
  if steps:
    common.update(num_train_steps=steps)
  lengths = list(lengths or NEEDLE_LENGTHS)
  lengths = [common["seq_len"]] + [n for n in lengths
                                   if n != common["seq_len"]]
  counts = {n: examples or NEEDLE_EXAMPLES.get(n, 4) for n in lengths}
  models = {}
  for variant in needle_variants():
    config = compare.make_config(get_config, variant, common)
    run_dir = os.path.join(workdir, variant.name)
    start = time.perf_counter()
    out = train.train_and_evaluate(config, run_dir)
    train_s = time.perf_counter() - start
    params = needle.load_params(config, run_dir)
    fns = {n: needle.model_predict_fn(config, params, n) for n in lengths}
    acc = needle.needle_accuracy(fns, depths=NEEDLE_DEPTHS,
                                 num_examples=counts)
    models[variant.name] = dict(
        accuracy=acc["accuracy"], token_accuracy=acc["token_accuracy"],
        eval_seconds=acc["seconds"], train_wall_s=train_s,
        train_eval=out["eval"], step=out["step"], arg=variant.arg,
        overrides={**common, **variant.overrides})
    for n in lengths:
      mean = sum(acc["accuracy"][str(n)].values()) / len(NEEDLE_DEPTHS)
      print(f"{variant.name} L={n}: mean exact match {mean:.3f} "
            f"({acc['seconds'][str(n)]:.0f} s)")
    # Written after each model so a partial run still leaves results.
    out_json = dict(models=models, depths=list(NEEDLE_DEPTHS),
                    lengths=lengths, examples={str(n): c for n, c in
                                               counts.items()})
    compare.save_json(out_json, os.path.join(out_dir, NEEDLE_JSON))
  return out_json


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
