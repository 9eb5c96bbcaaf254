"""FlexAttention with the same score mods, shapes and masks as bench_core.py.

  python3 benchmarks/core/flex_score_mod.py --out OUT/flex.json

torch FlexAttention (torch.compile'd, bf16, B1 H32 d128): no mod, ALiBi
(score - slopes[h] * |q - kv|) and a learned relative-position table
(score + table[h, clamp(kv - q, -(W-1), W-1) + W - 1], gradient to the
table) on S2 32K (block 128, local 8, stride 8: the block lists of
.peer/peer_baselines.py) and dense causal 16K; forward and forward+backward
medians (triton.testing.do_bench). It also runs the backward twice and
records whether the table gradients are bit-identical (FlexAttention
accumulates them with atomics).
"""

import argparse
import importlib.util
import json
import os

import numpy as np


def _peer_baselines():
  path = os.path.join(os.path.dirname(__file__), "..", "..", ".peer",
                      "peer_baselines.py")
  spec = importlib.util.spec_from_file_location("peer_baselines", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--heads", type=int, default=32)
  ap.add_argument("--head_dim", type=int, default=128)
  ap.add_argument("--window", type=int, default=128)
  ap.add_argument("--mods", default="none,relative_bias,alibi")
  ap.add_argument("--cases", default="s2,dense_causal")
  a = ap.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn.attention import flex_attention as fa  # pylint: disable=g-import-not-at-top
  BlockMask, create_block_mask = fa.BlockMask, fa.create_block_mask
  flex_attention = fa.flex_attention
  from triton.testing import do_bench  # pylint: disable=g-import-not-at-top

  peers = _peer_baselines()
  flex = torch.compile(flex_attention, dynamic=False)
  dev, dt, blk = "cuda", torch.bfloat16, 128
  b, h, d, w = 1, a.heads, a.head_dim, a.window

  def s2_mask(seq):
    bm = peers.s2_block_mask(seq // blk, h, 8, 8)
    eye = np.eye(bm.shape[1], dtype=bool)[None]

    def lists(m):
      cnt = m.sum(-1).astype(np.int32)
      idx = np.argsort(~m, axis=-1, kind="stable").astype(np.int32)
      return (torch.from_numpy(cnt)[None].to(dev),
              torch.from_numpy(idx)[None].to(dev))

    pc, pi = lists(bm & eye)
    fc, fi = lists(bm & ~eye)
    return BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=blk,
                                    mask_mod=lambda b, h, q, k: q >= k)

  slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)],
                        device=dev)
  table = (0.1 * torch.randn(h, 2 * w - 1, device=dev)).requires_grad_()

  def alibi(score, bb, hh, qi, ki):
    return score - slopes[hh] * (qi - ki).abs()

  def relative_bias(score, bb, hh, qi, ki):
    return score + table[hh, (ki - qi).clamp(-(w - 1), w - 1) + (w - 1)]

  score_mods = {"none": None, "alibi": alibi, "relative_bias": relative_bias}
  meta = dict(torch=torch.__version__, device=torch.cuda.get_device_name())
  print(meta, flush=True)
  rows, inputs, base = [], {}, {}
  cases = a.cases.split(",")
  # Most informative first (each pair compiles anew): the results so far
  # are written after every row, so a timeout keeps them.
  order = [(c, m) for m in a.mods.split(",") for c in cases]
  for case, name in order:
    seq = 32768 if case == "s2" else 16384
    if case not in inputs:
      mask = s2_mask(seq) if case == "s2" else create_block_mask(
          lambda bb, hh, qi, ki: qi >= ki, None, None, seq, seq, device=dev)
      q, k, v = (torch.randn(b, h, seq, d, device=dev, dtype=dt,
                             requires_grad=True) for _ in range(3))
      inputs[case] = (mask, q, k, v, torch.randn_like(q))
    mask, q, k, v, do = inputs[case]
    mod = score_mods[name]
    row = dict(case=case, seq=seq, impl="flex_attention",
               mod=f"relative_bias_w{w}" if name == "relative_bias" else name)
    leaves = [q, k, v] + ([table] if name == "relative_bias" else [])
    try:
      def fwd(q=q, k=k, v=v, mod=mod, mask=mask):
        return flex(q, k, v, score_mod=mod, block_mask=mask)

      def fb(do=do):
        fwd().backward(do)

      row["fwd_ms"] = do_bench(fwd, warmup=25, rep=100, return_mode="median")
      row["fwdbwd_ms"] = do_bench(fb, warmup=10, rep=60, return_mode="median",
                                  grad_to_none=leaves)
      if name == "relative_bias":
        grads = []
        for _ in range(2):
          table.grad = None
          fb()
          grads.append(table.grad.detach().clone())
        row["param_grad_bit_identical"] = bool(torch.equal(*grads))
      if name == "none":
        base[case] = row
      elif "fwd_ms" in base.get(case, {}):
        row["fwd_overhead"] = row["fwd_ms"] / base[case]["fwd_ms"] - 1
        row["fwdbwd_overhead"] = (row["fwdbwd_ms"] /
                                  base[case]["fwdbwd_ms"] - 1)
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(row), flush=True)
    rows.append(row)
    with open(a.out, "w") as f:
      json.dump(dict(meta, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
