"""Plots of the decode benchmark and the decode-accuracy run (headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

MAIN = ("cudnn", "dense_xla", "paged_dense", "quest", "quest_p32",
        "double_sparsity",
        "tidal_reuse_128", "tidal_reuse_2048", "tidal_128_layer_avg",
        "tidal_2048_layer_avg", "moa")


def decode_times(rows, peers, path):
  """us per step per method, one group of bars per length (log scale)."""
  lengths = sorted({r["length"] for r in rows if "us_per_step" in r})
  names = [n for n in MAIN if any(r["name"] == n for r in rows)]
  fig, ax = plt.subplots(figsize=(11, 4.5))
  width = 0.8 / max(len(names), 1)
  for i, name in enumerate(names):
    ys = [next((r["us_per_step"] for r in rows if r["name"] == name and
                r["length"] == L and "us_per_step" in r), np.nan)
          for L in lengths]
    ax.bar(np.arange(len(lengths)) + i * width, ys, width, label=name)
  for p in peers:
    if "us_per_step" in p and "default" in p["impl"]:
      x = lengths.index(p["length"]) if p["length"] in lengths else None
      if x is not None:
        ax.hlines(p["us_per_step"], x - 0.1, x + 0.9, colors="k",
                  linestyles="--", label="torch SDPA (GQA)" if x == 0 else None)
  ax.set_xticks(np.arange(len(lengths)) + 0.4)
  ax.set_xticklabels([f"{L // 1024}K" for L in lengths])
  ax.set_yscale("log")
  ax.set_ylabel("us per decode step (one layer)")
  ax.set_title("Decode, batch 8, 32 q / 8 kv heads, d128, bf16")
  ax.legend(fontsize=7, ncol=2)
  ax.grid(True, axis="y", which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def speedup_vs_bytes(rows, path):
  """Speed-up over dense against 1 / fraction of dense bytes read."""
  fig, ax = plt.subplots(figsize=(6, 5))
  pts = [(1 / r["read_fraction"], r["speedup_vs_best_dense"], r["name"],
          r["length"]) for r in rows if r.get("read_fraction") and
         "speedup_vs_best_dense" in r and not r["name"].endswith("_select")]
  for x, y, name, length in pts:
    ax.scatter(x, y, s=18)
    ax.annotate(f"{name} {length // 1024}K", (x, y), fontsize=6)
  if pts:
    hi = max(max(p[0] for p in pts), max(p[1] for p in pts)) * 1.3
    ax.plot([1, hi], [1, hi], "k--", lw=0.8, label="speed-up = bytes saved")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("dense bytes / bytes read")
  ax.set_ylabel("speed-up over the best dense")
  ax.legend(fontsize=7)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def accuracy(result, path):
  """Needle exact match and answer NLL per method and length."""
  methods = list(result["methods"])
  lengths = result["lengths"]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  width = 0.8 / max(len(methods), 1)
  for i, m in enumerate(methods):
    r = result["methods"][m]
    for ax, key in zip(axes, ("exact_match", "answer_nll")):
      ys = [r.get(key, {}).get(str(L), np.nan) for L in lengths]
      ax.bar(np.arange(len(lengths)) + i * width, ys, width, label=m)
  for ax, title in zip(axes, ("needle exact match", "answer NLL (nats)")):
    ax.set_xticks(np.arange(len(lengths)) + 0.4)
    ax.set_xticklabels([f"{L // 1024}K" for L in lengths])
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
