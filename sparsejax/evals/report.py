"""Runs the S2 quality comparisons and writes their JSON and plots.

Each comparison writes `<out_dir>/<name>.json`; `plot_all` redraws every
plot from those files (so plots never need a rerun).
"""

import os
import time
from typing import Any, Callable, Optional, Sequence

from sparsejax.evals import compare
from sparsejax.evals import needle
from sparsejax.training import train

LOSS_JSON = "loss_comparison.json"
NEEDLE_JSON = "needle.json"

# Needle models: 2 layers (hybrid: s2, dense), d_model 64, 4 q / 4 kv heads,
# trained at 64 tokens with 128 needles per step: the loss covers only the 2
# answer tokens of each sequence, so short sequences and big batches give
# the most signal per CPU second. (At 256 tokens x 32 and at 128 tokens x 64
# the answer loss was still at chance, ~5.55 nats, after 200 / 160 steps.)
NEEDLE_COMMON = {
    "seq_len": 64,
    "batch_size": 128,
    "num_train_steps": 1000,
    # 200K distinct needles (128K seen): with the default 20K the models
    # memorised the training answers (train loss fell, eval stayed at chance).
    "data.num_examples": 200_000,
    "model.num_layers": 2,
    "model.d_model": 64,
    "model.mlp_dim": 256,
    "model.num_heads": 4,
    "model.num_kv_heads": 4,
    # Dense jnp with the mask applied (same numbers as "xla"): at 128 tokens
    # the blockwise scan over 16-token blocks is overhead-bound on CPU. The
    # long-context evaluation runs impl="xla".
    "attention.impl": "reference",
    "log_every": 20,
    "eval_steps": 4,
    "progress_bar": False,
}
NEEDLE_LENGTHS = (2048, 4096, 8192, 16384)
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Needles per (length, depth); fewer at the longest (forward-only on CPU).
NEEDLE_EXAMPLES = {64: 32, 2048: 8, 4096: 4, 8192: 4, 16384: 2}
NEEDLE_GATE_LEN, NEEDLE_GATE_ACC = 4096, 0.05


def needle_variants() -> list[compare.Variant]:
  """dense and s2_hybrid (odd layers dense) on the needle task."""
  # S2 with 16-token blocks (a 32-token band plus every 4th block in each
  # head); the pattern is a property of the model, so the long evaluation
  # uses the same blocks. Dense uses 64-token blocks (the block size does
  # not change dense attention, only its speed).
  s2 = {"attention.options": dict(compare.S2_OPTIONS, block_size=16)}
  return [
      compare.Variant("dense", "attention=dense,task=needle",
                      {"attention.options": dict(block_size=64)}),
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

  Models train at `NEEDLE_COMMON["seq_len"]` (both first, so an interrupted
  run resumes from the checkpoints) and are then evaluated at the train
  length and at `lengths` (RoPE: the params do not depend on the length).
  Lengths above `NEEDLE_GATE_LEN` are skipped for a model whose exact match
  at the train length is below `NEEDLE_GATE_ACC` (chance stays chance, and
  those forwards cost minutes on CPU); they are listed under "skipped".
  """
  common = dict(NEEDLE_COMMON)
  if steps:
    common.update(num_train_steps=steps)
  train_len = common["seq_len"]
  lengths = [train_len] + [n for n in (lengths or NEEDLE_LENGTHS)
                           if n != train_len]
  counts = {n: examples or NEEDLE_EXAMPLES.get(n, 2) for n in lengths}
  runs = {}
  for variant in needle_variants():
    config = compare.make_config(get_config, variant, common)
    run_dir = os.path.join(workdir, variant.name)
    start = time.perf_counter()
    out = train.train_and_evaluate(config, run_dir)
    runs[variant.name] = (variant, config, run_dir, out,
                          time.perf_counter() - start)
  models = {}
  out_json = dict(models=models, depths=list(NEEDLE_DEPTHS), lengths=lengths,
                  examples={str(n): c for n, c in counts.items()})
  for name, (variant, config, run_dir, out, train_s) in runs.items():
    params = needle.load_params(config, run_dir)
    result = dict(accuracy={}, token_accuracy={}, eval_seconds={},
                  skipped=[], train_wall_s=train_s, train_eval=out["eval"],
                  step=out["step"], arg=variant.arg,
                  overrides={**common, **variant.overrides})
    models[name] = result
    for n in lengths:
      # The train length is evaluated first: longer ones need it to pass.
      if n > NEEDLE_GATE_LEN and mean_over_depths(
          result["accuracy"][str(train_len)]) < NEEDLE_GATE_ACC:
        result["skipped"].append(n)
        continue
      acc = needle.needle_accuracy(
          {n: needle.model_predict_fn(config, params, n)},
          depths=NEEDLE_DEPTHS, num_examples=counts[n])
      for key in ("accuracy", "token_accuracy"):
        result[key][str(n)] = acc[key][str(n)]
      result["eval_seconds"][str(n)] = acc["seconds"][str(n)]
      print(f"{name} L={n}: mean exact match "
            f"{mean_over_depths(acc['accuracy'][str(n)]):.3f} "
            f"({acc['seconds'][str(n)]:.0f} s)", flush=True)
      # Written after each length so a partial run still leaves results.
      compare.save_json(out_json, os.path.join(out_dir, NEEDLE_JSON))
  compare.save_json(out_json, os.path.join(out_dir, NEEDLE_JSON))
  print(needle_table(out_json))
  return out_json


def needle_table(result: dict) -> str:
  """Markdown: exact match per (model, length) and depth, plus the mean."""
  depths = result["depths"]
  head = "| model | length | " + " | ".join(f"depth {d}" for d in depths)
  lines = [head + " | mean | eval s |",
           "|---|---|" + "---|" * (len(depths) + 2)]
  for name, m in result["models"].items():
    for n in result["lengths"]:
      acc = m["accuracy"].get(str(n))
      if acc is None:
        lines.append(f"| {name} | {n} | " + " | ".join("skipped" for _ in
                                                        depths) + " | | |")
        continue
      cells = " | ".join(f"{acc[str(d)]:.2f}" for d in depths)
      lines.append(f"| {name} | {n} | {cells} | {mean_over_depths(acc):.2f} | "
                   f"{m['eval_seconds'][str(n)]:.0f} |")
  return "\n".join(lines)


def mean_over_depths(per_depth: dict) -> float:
  return sum(per_depth.values()) / max(len(per_depth), 1)


def _load(out_dir: str, name: str):
  path = os.path.join(out_dir, name)
  return compare.load_json(path) if os.path.exists(path) else None


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
