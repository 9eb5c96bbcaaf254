"""Markdown table and plots of the vision benchmarks (sj rows + torch peers)."""

from __future__ import annotations

import collections
import json
import os

from sparsejax import plotting  # noqa: F401  (selects the Agg backend)
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top


def _peer_log_rows(path):
  """Rows from peer_variants.py's printed lines (fixed-width: case 9,
  contender 28, shape 34, mode, ms), for a run cut off before its JSON."""
  rows = []
  with open(path) as f:
    for line in f:
      parts = line[74:].split()
      if len(line) < 80 or len(parts) < 3 or parts[2] != "ms":
        continue
      try:
        ms = float(parts[1])
      except ValueError:
        continue
      rows.append(dict(case=line[:9].strip(), contender=line[10:38].strip(),
                       shape=line[39:73].strip(), bwd=parts[0] == "fwd+bwd",
                       ms=ms))
  return rows


def load_peers(paths):
  """Rows of .peer/peer_variants.py runs in the sj row format: each JSON
  file, or where it is missing (a timeout) the rows printed in the .log
  file of the same name."""
  out = []
  for path in ([paths] if isinstance(paths, str) else paths):
    if not path:
      continue
    log = os.path.splitext(path)[0] + ".log"
    if os.path.exists(path):
      with open(path) as f:
        rows = json.load(f).get("results", [])
    elif os.path.exists(log):
      rows = _peer_log_rows(log)
    else:
      continue
    out += [dict(r, contender="torch: " + r["contender"]) for r in rows
            if "ms" in r or "peak_mib" in r]
  return out


def _key(case):
  return "na" if case in ("na1d", "na2d", "na3d") else case


def _num(x, fmt):
  return "" if x is None else format(x, fmt)


def table(rows, peers) -> str:
  """One markdown table per case family: ms fwd / fwd+bwd per contender,
  XLA's compiled memory and the device allocator's peak (fwd+bwd)."""
  out = []
  grouped = collections.defaultdict(dict)
  for r in rows + peers:
    if not any(k in r for k in ("ms", "peak_mib", "device_peak_mib")):
      continue
    cell = grouped[(_key(r["case"]), r["shape"])].setdefault(
        r["contender"], {})
    if "ms" in r:
      cell[r["bwd"]] = r["ms"]
    if r.get("memory_mib") is not None and r["bwd"]:
      cell["compiled"] = r["memory_mib"]
    for k in ("peak_mib", "device_peak_mib"):  # torch's / ours, fwd+bwd
      if r.get(k) is not None:
        cell["peak"] = r[k]
  for case in sorted({c for c, _ in grouped}):
    out += [f"\n### {case}\n", "| shape | contender | fwd ms | fwd+bwd ms | "
            "compiled MiB (fwd+bwd) | device peak MiB (fwd+bwd) |",
            "|---|---|---|---|---|---|"]
    for (c, shape), contenders in sorted(grouped.items()):
      if c != case:
        continue
      for name, cell in sorted(contenders.items(),
                               key=lambda kv: kv[1].get(False, 1e9)):
        out.append(f"| {shape} | {name} | {_num(cell.get(False), '.3f')} | "
                   f"{_num(cell.get(True), '.3f')} | "
                   f"{_num(cell.get('compiled'), '.0f')} | "
                   f"{_num(cell.get('peak'), '.0f')} |")
  for r in rows:
    if "error" in r:
      out.append(f"\nFAILED {r['case']} {r['shape']} {r['contender']} "
                 f"{'fwd+bwd' if r['bwd'] else 'fwd'}: {r['error']}")
  return "\n".join(out) + "\n"


def plot(rows, peers, path, case):
  data = [r for r in rows + peers if "ms" in r and _key(r["case"]) == case]
  if not data:
    return
  shapes = sorted({r["shape"] for r in data})
  names = sorted({r["contender"] for r in data})
  fig, axes = plt.subplots(1, 2, figsize=(14, 1.2 + 0.9 * len(shapes)))
  for ax, bwd in zip(axes, (False, True)):
    h = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
      ys, xs = [], []
      for j, s in enumerate(shapes):
        for r in data:
          if r["contender"] == name and r["shape"] == s and r["bwd"] == bwd:
            ys.append(j + i * h)
            xs.append(r["ms"])
      ax.barh(ys, xs, height=h, label=name)
    ax.set_yticks([j + 0.4 for j in range(len(shapes))])
    ax.set_yticklabels(shapes, fontsize=7)
    if any(r["bwd"] == bwd for r in data):
      ax.set_xscale("log")
    ax.set_xlabel("ms (median)")
    ax.set_title(f"{case} {'forward + backward' if bwd else 'forward'}")
  axes[1].legend(fontsize=6, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(rows, peers, out_dir, plots=True):
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(dict(rows=rows, peers=peers), f, indent=1)
  if not plots:
    return
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(table(rows, peers))
  for case in ("maxvit", "na", "na_bias", "biformer"):
    plot(rows, peers, os.path.join(out_dir, f"{case}.png"), case)
