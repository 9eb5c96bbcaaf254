"""core.json (+ flex.json) -> results.md and score_mod_overhead.png.

  python benchmarks/core/report.py OUTDIR
"""

import json
import os
import sys


def _load(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _pct(x):
  return "" if x is None else f"{100 * x:+.1f}%"


def _ms(r, key):
  return f"{r[key]:.2f}" if key in r else "n/a"


def tables(core, flex):
  rows = list(core.get("attention", [])) if core else []
  rows += list(flex.get("rows", [])) if flex else []
  lines = ["## Score-mod overhead (bf16, B1 H32 d128)", "",
           "| case | impl | mod | fwd ms | fwd+bwd ms | fwd overhead | "
           "fwd+bwd overhead | param grad bit-identical |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['case']} {r['seq']} | {r['impl']} | {r['mod']} | "
                   f"FAILED: {r['error'][:80]} |||||")
      continue
    lines.append(
        f"| {r['case']} {r['seq']} | {r['impl']} | {r['mod']} | "
        f"{_ms(r, 'fwd_ms')} | {_ms(r, 'fwdbwd_ms')} | "
        f"{_pct(r.get('fwd_overhead'))} | {_pct(r.get('fwdbwd_overhead'))} | "
        f"{r.get('param_grad_bit_identical', '')} |")
  train = core.get("train", []) if core else []
  if train:
    lines += ["", "## Training tokens/s (S2 LM, 8K context, bf16)", "",
              "| data.pack | tokens/s | step ms | first / last loss | "
              "masked targets |", "|---|---|---|---|---|"]
    for r in train:
      if "error" in r:
        lines.append(f"| {r['pack']} | FAILED: {r['error'][:80]} ||||")
        continue
      lines.append(f"| {r['pack']} | {r['tokens_per_s']:,.0f} | "
                   f"{r['step_ms']:.1f} | {r['first_loss']:.3f} / "
                   f"{r['last_loss']:.3f} | "
                   f"{100 * r['masked_target_fraction']:.2f}% |")
  return "\n".join(lines) + "\n", rows


def plot(rows, path):
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  bars = [r for r in rows if "fwdbwd_overhead" in r]
  if not bars:
    return
  fig, ax = plt.subplots(figsize=(8, 3.5))
  labels = [f"{r['case']}\n{r['impl'].replace('pallas_', '')}\n{r['mod']}"
            for r in bars]
  x = range(len(bars))
  ax.bar([i - 0.2 for i in x], [100 * r["fwd_overhead"] for r in bars], 0.4,
         label="forward")
  ax.bar([i + 0.2 for i in x], [100 * r["fwdbwd_overhead"] for r in bars],
         0.4, label="forward+backward")
  ax.axhline(10, color="gray", ls="--", lw=0.8)
  ax.set_xticks(list(x))
  ax.set_xticklabels(labels, fontsize=6)
  ax.set_ylabel("time over no mod (%)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=150)


def main():
  out = sys.argv[1]
  core, flex = _load(os.path.join(out, "core.json")), _load(
      os.path.join(out, "flex.json"))
  text, rows = tables(core, flex)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
  plot(rows, os.path.join(out, "score_mod_overhead.png"))
  print(text)


if __name__ == "__main__":
  main()
