"""Hybrid lightning LM vs the softmax LM: eval loss at equal steps.

Each variant is a `configs/lm.py` config on the local byte corpus with the
same model, data and steps, differing in the attention section only:

  softmax           every layer dense causal softmax
  lightning_hybrid  lightning layers with a softmax layer every N layers
                    (MiniMax-Text-01: N = 8, 7 lightning : 1 softmax)
  lightning         every layer lightning (CPU preset only)

`run` trains them one after another (a finished run in workdir resumes at
its end), writes `<out_dir>/linear_quality.json` after each and draws
`linear_quality.png`. The target of issue #12: hybrid eval loss within 2% of
softmax.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, Optional, Sequence

from sparsejax.evals import compare
from sparsejax.training import train

JSON_NAME = "linear_quality.json"
PLOT_NAME = "linear_quality.png"

_BASE = {"model.num_kv_heads": 4, "model.num_heads": 4,
         "progress_bar": False}
PRESETS: Dict[str, Dict[str, Any]] = {
    # ~10 minutes on 2 CPU cores for the three variants.
    "cpu": dict(every=4, variants=("softmax", "lightning_hybrid",
                                   "lightning"), common={
        **_BASE, "seq_len": 256, "batch_size": 8, "num_train_steps": 150,
        "model.num_layers": 4, "model.d_model": 128, "model.mlp_dim": 512,
        "attention.impl": "xla", "log_every": 10, "eval_every": 50,
        "eval_steps": 8}),
    # One H200, <= 90 s for both variants (compiles included), bf16.
    "gpu": dict(every=8, variants=("softmax", "lightning_hybrid"), common={
        **_BASE, "seq_len": 512, "batch_size": 16, "num_train_steps": 200,
        "model.num_layers": 8, "model.d_model": 256, "model.mlp_dim": 1024,
        "dtype": "bfloat16", "attention.impl": "auto", "log_every": 25,
        "eval_every": 100, "eval_steps": 8, "checkpoint.every": 200,
        "data.max_bytes": 8_000_000}),
    # Seconds: the code path only.
    "smoke": dict(every=2, variants=("softmax", "lightning_hybrid"), common={
        **_BASE, "seq_len": 64, "batch_size": 4, "num_train_steps": 4,
        "model.num_layers": 2, "model.d_model": 32, "model.mlp_dim": 64,
        "model.num_heads": 2, "model.num_kv_heads": 2,
        "attention.impl": "xla", "log_every": 2, "eval_every": 2,
        "eval_steps": 1}),
}


def variants(every: int) -> Dict[str, compare.Variant]:
  return {
      "softmax": compare.Variant("softmax", "attention=dense", {
          "attention.options": dict(block_size=128)}),
      "lightning_hybrid": compare.Variant(
          "lightning_hybrid", "attention=lightning",
          {"attention.dense_every_n": every}),
      "lightning": compare.Variant("lightning", "attention=lightning"),
  }


def _train(get_config, variant, common, run_dir):
  config = compare.make_config(get_config, variant, common)
  start = time.perf_counter()
  out = train.train_and_evaluate(config, run_dir)
  scalars = compare.read_scalars(run_dir)
  return dict(eval=out["eval"], step=out["step"],
              wall_s=time.perf_counter() - start,
              train_loss=scalars.get("train/loss", out["history"]),
              eval_loss=scalars.get("eval/loss", []), arg=variant.arg,
              overrides={**common, **variant.overrides})


def run(get_config: Callable[[str], Any], preset: str, workdir: str,
        out_dir: str, *, steps: Optional[int] = None,
        names: Optional[Sequence[str]] = None) -> dict:
  """Trains the preset's variants; returns (and writes) the results JSON.

  With attention.impl "auto" a variant that fails (e.g. a kernel on a new
  GPU) is retrained with impl "xla" (the same math) and the reason kept.
  """
  if preset not in PRESETS:
    raise ValueError(f"preset must be one of {sorted(PRESETS)}, got "
                     f"{preset!r}")
  spec = PRESETS[preset]
  common = dict(spec["common"])
  if steps:
    common.update(num_train_steps=steps,
                  eval_every=max(steps // 2, 1))
  table = variants(spec["every"])
  names = list(names or spec["variants"])
  out = dict(preset=preset, hybrid_every=spec["every"], runs={},
             fallbacks={})
  for name in names:
    run_dir = os.path.join(workdir, name)
    try:
      out["runs"][name] = _train(get_config, table[name], common, run_dir)
    except Exception as e:  # pylint: disable=broad-except
      if common.get("attention.impl") != "auto":
        raise
      out["fallbacks"][name] = f"{type(e).__name__}: {str(e)[:300]}"
      print(f"{name}: impl=auto failed ({out['fallbacks'][name]}); "
            f"retrying with impl=xla", flush=True)
      out["runs"][name] = _train(get_config, table[name],
                                 dict(common, **{"attention.impl": "xla"}),
                                 run_dir + "_xla")
    r = out["runs"][name]
    print(f"{name}: eval loss {r['eval']['loss']:.4f} at step {r['step']} "
          f"({r['wall_s']:.0f} s)", flush=True)
    if "softmax" in out["runs"]:
      out["gap_vs_softmax"] = compare.relative_gap(out["runs"], "softmax")
    compare.save_json(out, os.path.join(out_dir, JSON_NAME))
  plot(out, os.path.join(out_dir, PLOT_NAME))
  return out


def plot(result: dict, path: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  gaps = result.get("gap_vs_softmax", {})
  for i, (name, r) in enumerate(result["runs"].items()):
    color = f"C{i}"
    if r["train_loss"]:
      ax.plot(*zip(*r["train_loss"]), color=color, lw=1, alpha=0.6,
              label=f"{name} train")
    if r["eval_loss"]:
      gap = f", {100 * gaps[name]:+.1f}% vs softmax" if name in gaps else ""
      ax.plot(*zip(*r["eval_loss"]), "o-", color=color, lw=2,
              label=f"{name} eval (final {r['eval']['loss']:.3f}{gap})")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / byte)")
  ax.set_title(f"Byte LM, preset {result['preset']}: softmax vs lightning "
               f"hybrid ({result['hybrid_every'] - 1}:1)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
