"""Matplotlib (Agg) plots of the quality comparisons."""

from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def loss_curves(runs: Mapping[str, Mapping[str, Any]], path: str) -> str:
  """Train (thin) and eval (markers) loss vs step, one colour per variant."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (name, r) in enumerate(runs.items()):
    color = f"C{i}"
    steps, loss = zip(*r["train_loss"]) if r["train_loss"] else ((), ())
    ax.plot(steps, loss, color=color, lw=1, alpha=0.6,
            label=f"{name} train")
    if r["eval_loss"]:
      steps, loss = zip(*r["eval_loss"])
      ax.plot(steps, loss, "o-", color=color, lw=2,
              label=f"{name} eval (final {r['eval']['loss']:.3f})")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / byte)")
  ax.set_title("Byte LM on the local text corpus: dense vs S2 vs S2-hybrid")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  values = [v for r in runs.values()
            for _, v in r["train_loss"] + r["eval_loss"]]
  ax.set_ylim(min(values) - 0.05, min(values) + 1.6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def needle_heatmaps(result: Mapping[str, Any], path: str) -> str:
  """One accuracy heatmap (length x depth) per model, side by side."""
  models = result["models"]
  fig, axes = plt.subplots(1, len(models), figsize=(5.0 * len(models), 3.6),
                           squeeze=False)
  for ax, (name, m) in zip(axes[0], models.items()):
    lengths = result["lengths"]
    depths = result["depths"]
    grid = np.array([[m["accuracy"].get(str(l), {}).get(str(d), np.nan)
                      for d in depths] for l in lengths])
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(l) for l in lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length")
    trained = m.get("trained_at", m["overrides"]["seq_len"])
    ax.set_title(f"{name} (trained at {trained})")
    for i in range(len(lengths)):
      for j in range(len(depths)):
        text = "skip" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=8)
  fig.subplots_adjust(wspace=0.45)
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="exact match")
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def needle_vs_length(result: Mapping[str, Any], path: str) -> str:
  """Mean exact match vs context length per model, and the train loss."""
  fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
  lengths = result["lengths"]
  for i, (name, m) in enumerate(result["models"].items()):
    done = [n for n in lengths if str(n) in m["accuracy"]]
    mean = [np.mean(list(m["accuracy"][str(n)].values())) for n in done]
    ax.plot(done, mean, "o-", color=f"C{i}", label=name)
    if m.get("train_loss"):
      steps, _, loss = zip(*m["train_loss"])
      # Lengths alternate step to step: a running mean shows the trend.
      k = max(len(loss) // 50, 1)
      smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
      ax_loss.plot(steps[k - 1:], smooth, color=f"C{i}", label=name)
  ax.set_xscale("log", base=2)
  ax.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n)
                          for n in lengths])
  ax.set_ylim(-0.03, 1.03)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("exact match (mean over depths)")
  ax.set_title("Needle retrieval")
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel("answer loss (nats, running mean)")
  ax_loss.set_title("Training (mixed lengths)")
  for a in (ax, ax_loss):
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
