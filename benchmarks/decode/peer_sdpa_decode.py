"""torch SDPA GQA decode on the GPU, the peer of the paged decode kernel.

One query token per sequence: q [B, H, 1, D], k, v [B, Hkv, L, D], bf16,
`F.scaled_dot_product_attention(..., enable_gqa=True)`, timed with
`triton.testing.do_bench` (median) for the default dispatch and each
backend that accepts the call. Run on the GPU machine, in the same session
as the JAX benchmark:

    python3 benchmarks/decode/peer_sdpa_decode.py --lengths 32768 131072 --out peers.json
"""
import argparse
import json


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--heads", type=int, default=32)
  ap.add_argument("--kv-heads", type=int, default=8)
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--out", default="")
  a = ap.parse_args()

  import torch
  import torch.nn.functional as F
  from torch.nn.attention import SDPBackend, sdpa_kernel
  from triton.testing import do_bench

  # (MATH materialises the GQA repeat: not a contender, and slow.)
  backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION}
  rows = []

  def save():  # after every row: a run cut short keeps what it measured
    if a.out:
      with open(a.out, "w") as fh:
        json.dump(rows, fh, indent=1)

  for length in a.lengths:
    torch.cuda.empty_cache()
    q = torch.randn(a.batch, a.heads, 1, a.head_dim, device="cuda",
                    dtype=torch.bfloat16)
    k, v = (torch.randn(a.batch, a.kv_heads, length, a.head_dim,
                        device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    read = 2 * k.numel() * k.element_size()
    for name, backend in backends.items():
      def f():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
      try:
        if backend is None:
          us = do_bench(f, warmup=25, rep=100, return_mode="median") * 1e3
        else:
          with sdpa_kernel(backend):
            f()
            us = do_bench(f, warmup=25, rep=100, return_mode="median") * 1e3
        rows.append(dict(impl=f"torch sdpa gqa ({name})", length=length,
                         us_per_step=us, read_tb_per_s=read / us * 1e-6))
        print(f"torch sdpa gqa {name:9s} L={length:7d} {us:9.1f} us "
              f"{read / us * 1e-6:5.2f} TB/s", flush=True)
      except Exception as e:  # a backend refusing the call is a finding
        print(f"torch sdpa gqa {name:9s} L={length:7d} FAILED "
              f"{type(e).__name__}: {str(e)[:120]}", flush=True)
        rows.append(dict(impl=f"torch sdpa gqa ({name})", length=length,
                         error=str(e)[:300]))
      save()
    del q, k, v


if __name__ == "__main__":
  main()
