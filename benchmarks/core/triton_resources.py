r"""Registers, spills and shared memory of the block-sparse Triton kernels
(forward, dQ, dK/dV) for sm90 with and without each score mod, compiled on a
CPU-only machine (the approach of benchmarks/linear/triton_resources.py).

Pallas lowers each kernel to Triton IR; the `triton` package (not a
sparsejax dependency: `pip install --no-deps --target /tmp/tritonpkg
triton==3.9.0`) compiles that IR for sm90 without a GPU. jaxlib's bundled
Triton may differ slightly; this checks that a mod's kernels fit in shared
memory (227 KB) before GPU time is spent.

  PYTHONPATH=$PWD python benchmarks/core/triton_resources.py \
      --triton_path=/tmp/tritonpkg --case=s2 --mods=none,alibi,relative_bias
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

_COMPILE = r'''
import json, os, re, subprocess, sys
import triton
from triton._C.libtriton import ir, passes
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
jobs = json.load(open(sys.argv[1]))
tools = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
target = GPUTarget("cuda", 90, 32)


def make_ttir(path):
  """The TTIR passes XLA runs on Pallas' IR (triton.compile skips them for
  an IR file; as benchmarks/linear/triton_resources.py)."""
  ctx = ir.context()
  ir.load_dialects(ctx)
  CUDABackend(target).load_dialects(ctx)
  mod = ir.parse_mlir_module(path, ctx)
  mod.context = ctx
  pm = ir.pass_manager(ctx)
  passes.common.add_inliner(pm)
  passes.common.add_canonicalizer(pm)
  passes.ttir.add_combine(pm)
  passes.ttir.add_reorder_broadcast(pm)
  passes.common.add_cse(pm)
  passes.common.add_licm(pm)
  passes.common.add_symbol_dce(pm)
  pm.run(mod, "make_ttir")
  out = path[:-len(".ttir")] + ".combined.ttir"
  open(out, "w").write(str(mod))
  return out


for job in jobs:
  label = f"{job['mod']:14s} {job['name']:32s}"
  try:
    k = triton.compile(make_ttir(job["path"]), target=target,
                       options=dict(num_warps=job["warps"],
                                    num_stages=job["stages"]))
    cubin = job["path"] + ".cubin"
    open(cubin, "wb").write(k.asm["cubin"])
    use = subprocess.run([os.path.join(tools, "cuobjdump"),
                          "--dump-resource-usage", cubin],
                         capture_output=True, text=True).stdout
    reg = re.search(r"REG:(\d+)", use).group(1)
    stack = re.search(r"STACK:(\d+)", use).group(1)
    sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass",
                           cubin], capture_output=True, text=True).stdout
    n = len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.M))
    print(f"{label} w{job['warps']} s{job['stages']}: {reg:>3s} regs, "
          f"{stack:>4s} B stack, {k.metadata.shared / 1024:6.1f} KB shared, "
          f"{n} SASS instrs", flush=True)
    if job.get("dump"):
      open(os.path.join(job["dump"], job["mod"] + "_" + job["name"] +
                        ".sass"), "w").write(sass)
      open(os.path.join(job["dump"], job["mod"] + "_" + job["name"] +
                        ".ttgir"), "w").write(k.asm["ttgir"])
  except Exception as e:  # report and go on
    print(f"{label} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
'''


def _mod(name, heads, window):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import sparsejax as sj  # pylint: disable=g-import-not-at-top
  if name == "none":
    return None, jnp.zeros((heads,), jnp.float32)
  if name == "alibi":
    return sj.score_mods.Alibi, sj.score_mods.Alibi.geometric_slopes(heads)
  if name == "relative_bias":
    return sj.score_mods.RelativeBias, jax.ShapeDtypeStruct(
        (heads, 2 * window - 1), jnp.float32)
  raise ValueError(f"--mods: unknown mod {name!r}")


def capture(a, mod_name, out_dir):
  """Lowers fwd + vjp for CUDA; returns the kernels' IR jobs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax._src.pallas.triton import pallas_call_registration as reg  # pylint: disable=g-import-not-at-top
  import sparsejax as sj  # pylint: disable=g-import-not-at-top
  from pallas_kernels.gpu import block_sparse_attention as kernel  # pylint: disable=g-import-not-at-top

  modules = []
  original = reg.lowering.lower_jaxpr_to_triton_module

  def keep(*args, **kwargs):
    result = original(*args, **kwargs)
    modules.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  reg.lowering.lower_jaxpr_to_triton_module = keep
  try:
    if a.case == "s2":
      mask = sj.masks.s2(a.seq, a.heads, block_size=a.block, local_blocks=8,
                         vert_stride=8)
    else:
      mask = sj.masks.causal(a.seq, block_size=a.block)
    make, param = _mod(mod_name, a.heads, a.window)
    tuning = kernel.TuningConfig(**json.loads(a.tuning)) if a.tuning else None
    x = jax.ShapeDtypeStruct((1, a.seq, a.heads, a.head_dim),
                             jnp.dtype(a.dtype))
    p = (param if isinstance(param, jax.ShapeDtypeStruct) else
         jax.ShapeDtypeStruct(param.shape, param.dtype))

    def attn(q, k, v, p):
      return sj.attention(q, k, v, mask, impl="pallas_triton", tuning=tuning,
                          score_mod=None if make is None else make(p))

    def fwdbwd(q, k, v, p, do):
      return jax.vjp(attn, q, k, v, p)[1](do)

    with sj.target_platform("gpu", "NVIDIA H200"):
      text = jax.jit(fwdbwd).trace(x, x, x, p, x).lower(
          lowering_platforms=("cuda",)).as_text()
  finally:
    reg.lowering.lower_jaxpr_to_triton_module = original
  meta = re.findall(r'name = "(\w+)", num_stages = (\d+) : i32, '
                    r'num_warps = (\d+) : i32', text)
  jobs = []
  for i, (module, (name, stages, warps)) in enumerate(zip(modules, meta)):
    path = os.path.join(out_dir, f"{mod_name}_{i}_{name}.ttir")
    with open(path, "w") as f:
      f.write(module)
    jobs.append(dict(path=path, name=name, stages=int(stages),
                     warps=int(warps), mod=mod_name, dump=a.dump))
  return jobs


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--triton_path", required=True,
                  help="folder holding the `triton` package")
  ap.add_argument("--case", default="s2", choices=("s2", "dense_causal"))
  ap.add_argument("--seq", type=int, default=4096)
  ap.add_argument("--heads", type=int, default=32)
  ap.add_argument("--head_dim", type=int, default=128)
  ap.add_argument("--block", type=int, default=128)
  ap.add_argument("--window", type=int, default=128)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--mods", default="none,alibi,relative_bias")
  ap.add_argument("--tuning", default="",
                  help='TuningConfig fields as JSON, e.g. {"sub_kv_fwd": 64}')
  ap.add_argument("--dump", default="",
                  help="folder for each kernel's SASS and TTGIR")
  a = ap.parse_args()
  if a.dump:
    os.makedirs(a.dump, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    jobs = []
    for mod_name in a.mods.split(","):
      jobs += capture(a, mod_name, tmp)
    spec = os.path.join(tmp, "jobs.json")
    with open(spec, "w") as f:
      json.dump(jobs, f)
    env = dict(os.environ, PYTHONPATH=a.triton_path,
               TRITON_DEFAULT_FP_FUSION="1")
    subprocess.run([sys.executable, "-c", _COMPILE, spec], env=env,
                   check=False)


if __name__ == "__main__":
  main()
