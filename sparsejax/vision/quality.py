"""Vision attention on a real image task: test accuracy at equal steps.

sklearn's handwritten digits (1438 train / 359 test 8x8 images, shipped in
the wheel, no download; `sparsejax.data.digits`) at one token per pixel, so
every model sees an 8x8 token map. Variants:

  dense         ViT, dense attention (the baseline)
  maxvit_block  ViT with MaxViT block attention (4x4 windows, rel. bias)
  maxvit_grid   ViT with MaxViT grid attention (4x4 grid, rel. bias)
  neighborhood  ViT with 3x3 neighborhood attention (NATTEN rpb bias)
  routing       ViT with BiFormer routing (2x2 regions, top-2, LePE)
  maxvit        the MaxViT model (MBConv + block + grid attention; small)

The ViTs share everything but the attention layer; MaxViT is its own
architecture (configs/maxvit.py:small) at about the same width. `run`
trains them one after another (a finished run in workdir resumes at its
end), writes `<out_dir>/vision_quality.json` after each run and draws
`vision_quality.png` (test accuracy and train loss against step).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, Optional, Sequence

from sparsejax.evals import compare
from sparsejax.training import train

JSON_NAME = "vision_quality.json"
PLOT_NAME = "vision_quality.png"
TEST_SIZE = 359  # digits_split(seed=0): one eval batch holds the whole split

_COMMON = {"progress_bar": False, "attention.impl": "xla",
           "data.name": "digits", "checkpoint.every": 10 ** 6}
PRESETS: Dict[str, Dict[str, Any]] = {
    # A few minutes on 2 idle CPU cores for all six variants.
    "cpu": dict(common={**_COMMON, "batch_size": 32, "num_train_steps": 400,
                        "log_every": 20, "eval_every": 100,
                        "eval_batch_size": TEST_SIZE, "eval_steps": 1},
                vit={"model.patch_size": 1, "model.d_model": 48,
                     "model.num_layers": 2, "model.num_heads": 4,
                     "model.num_kv_heads": 4, "model.mlp_dim": 96,
                     "optimizer.learning_rate": 2e-3}),
    # Seconds: the code path only.
    "smoke": dict(common={**_COMMON, "batch_size": 8, "num_train_steps": 4,
                          "log_every": 2, "eval_every": 2,
                          "eval_batch_size": TEST_SIZE, "eval_steps": 1},
                  vit={"model.patch_size": 1, "model.d_model": 16,
                       "model.num_layers": 1, "model.num_heads": 2,
                       "model.num_kv_heads": 2, "model.mlp_dim": 32}),
}
VIT_VARIANTS = ("dense", "maxvit_block", "maxvit_grid", "neighborhood",
                "routing")
VARIANTS = VIT_VARIANTS + ("maxvit",)


def variant(name: str, preset: dict) -> compare.Variant:
  if name == "maxvit":
    return compare.Variant("maxvit", "small")
  if name not in VIT_VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")
  return compare.Variant(name, f"attention={name}", preset["vit"])


def _train(get_config, var, common, run_dir):
  config = compare.make_config(get_config, var, common)
  start = time.perf_counter()
  out = train.train_and_evaluate(config, run_dir)
  scalars = compare.read_scalars(run_dir)
  return dict(eval=out["eval"], step=out["step"],
              wall_s=time.perf_counter() - start,
              train_loss=scalars.get("train/loss", out["history"]),
              eval_accuracy=scalars.get("eval/accuracy", []),
              eval_loss=scalars.get("eval/loss", []), arg=var.arg,
              overrides={**common, **var.overrides})


def run(get_configs: Dict[str, Callable[[str], Any]], preset: str,
        workdir: str, out_dir: str, *, steps: Optional[int] = None,
        names: Optional[Sequence[str]] = None) -> dict:
  """Trains the variants; returns (and writes) the results JSON.

  get_configs: {"vit": configs.vit.get_config, "maxvit":
  configs.maxvit.get_config} (the library does not import configs/).
  """
  if preset not in PRESETS:
    raise ValueError(f"preset must be one of {sorted(PRESETS)}, got "
                     f"{preset!r}")
  spec = PRESETS[preset]
  common = dict(spec["common"])
  if steps:
    common.update(num_train_steps=steps, eval_every=max(steps // 4, 1))
  out = dict(preset=preset, test_examples=TEST_SIZE, runs={})
  for name in list(names or VARIANTS):
    var = variant(name, spec)
    get_config = get_configs["maxvit" if name == "maxvit" else "vit"]
    r = _train(get_config, var, common, os.path.join(workdir, name))
    out["runs"][name] = r
    print(f"{name}: test accuracy {r['eval']['accuracy']:.4f} at step "
          f"{r['step']} ({r['wall_s']:.0f} s)", flush=True)
    compare.save_json(out, os.path.join(out_dir, JSON_NAME))
  plot(out, os.path.join(out_dir, PLOT_NAME))
  return out


def plot(result: dict, path: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4.2))
  for i, (name, r) in enumerate(result["runs"].items()):
    color = f"C{i}"
    if r["eval_accuracy"]:
      acc.plot(*zip(*r["eval_accuracy"]), "o-", color=color,
               label=f"{name} (final {r['eval']['accuracy']:.3f})")
    if r["train_loss"]:
      loss.plot(*zip(*r["train_loss"]), color=color, lw=1, label=name)
  acc.set_ylabel(f"test accuracy ({result['test_examples']} images)")
  loss.set_ylabel("train loss (nats)")
  for ax in (acc, loss):
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"sklearn digits (8x8 tokens), preset {result['preset']}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
