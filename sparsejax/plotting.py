"""Plots for benchmark results and training curves (matplotlib, headless)."""

from __future__ import annotations

import collections

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top


def plot_attention_bench(rows, peers, path, title=""):
  """Time vs length, one panel for forward and one for forward+backward.

  rows: benchmark rows (case, impl, seq, backward, ms); peers: rows from
  peer_baselines.py (impl, seq, backward, ms), drawn dashed.
  """
  fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharex=True)
  series = collections.defaultdict(list)
  for r in rows:
    if "ms" in r:
      series[(r["backward"], f"{r['case']} / {r['impl']}", False)].append(
          (r["seq"], r["ms"]))
  for r in peers:
    series[(r["backward"], r["impl"], True)].append((r["seq"], r["ms"]))
  for (bwd, label, peer), pts in sorted(series.items()):
    pts.sort()
    axes[int(bwd)].plot([p[0] for p in pts], [p[1] for p in pts],
                        "--" if peer else "-o", label=label, markersize=3)
  for ax, name in zip(axes, ("forward", "forward + backward")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("ms (median)")
    ax.set_title(f"{name} {title}")
    ax.grid(True, which="both", alpha=0.3)
  axes[1].legend(fontsize=7, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
