r"""Registers, spills and shared memory of the lightning Triton kernels for
sm90, compiled on a CPU-only machine.

Pallas lowers each kernel to Triton IR (jaxlib's lowering); the `triton`
package (not a sparsejax dependency: install it aside, e.g.
`pip install --no-deps --target /tmp/tritonpkg triton==3.9.0`) compiles that
IR for an H100/H200 target without a GPU, and cuobjdump reports the
resources. The GPU's own Triton (bundled in jaxlib) may differ slightly; this
is the check that a tile choice fits before spending GPU time.

  python benchmarks/linear/triton_resources.py --triton_path=/tmp/tritonpkg \
      --shape=2,16384,16,128,128 --dtype=bfloat16 \
      [--tuning="forward=split,num_splits=4"] [--decode_batch=256] [--ir=DIR]

--ir keeps each kernel's Triton IR, TTGIR, PTX and SASS in DIR (to read the
loop bodies: wgmma waits, shared-memory round trips, layout conversions).
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
  """The TTIR-level passes (combine: acc + dot -> dot with acc, ...) that
  XLA runs on Pallas' IR but triton.compile skips for an IR file."""
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
    if job.get("ir"):
      stem = os.path.join(job["ir"], os.path.basename(job["path"]))
      for kind in ("ttgir", "ptx"):
        open(f"{stem}.{kind}", "w").write(k.asm[kind])
      with open(stem + ".sass", "w") as f:
        subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-sass",
                        cubin], stdout=f, check=False)
    print(f"{job['name']:30s} warps {job['warps']:2d} stages "
          f"{job['stages']}: {reg:>3s} registers, {stack:>5s} B stack "
          f"(spills), {k.metadata.shared / 1024:6.1f} KB shared, "
          f"{k.asm['ptx'].count('wgmma.mma_async')} wgmma")
  except Exception as e:  # report and go on
    print(f"{job['name']}: FAILED {type(e).__name__}: {str(e)[:500]}")
'''


def parse_tuning(text):
  """'a=1,b=x' -> TuningConfig(a=1, b='x') (ints where they parse)."""
  from pallas_kernels.gpu.lightning_attention import TuningConfig  # pylint: disable=g-import-not-at-top
  kw = {}
  for item in filter(None, (x.strip() for x in (text or "").split(","))):
    key, value = item.split("=")
    try:
      kw[key.strip()] = int(value)
    except ValueError:
      try:
        kw[key.strip()] = float(value)
      except ValueError:
        kw[key.strip()] = value.strip()
  return TuningConfig(**kw)


def capture(shape, dtype, out_dir, tuning=None, decode_batch=None,
            chunk=None):
  """Lowers fwd + grad (and decode) for CUDA; returns the kernels' IR jobs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax._src.pallas.triton import lowering  # pylint: disable=g-import-not-at-top
  from jax._src.pallas.triton import pallas_call_registration as reg  # pylint: disable=g-import-not-at-top
  import sparsejax as sj  # pylint: disable=g-import-not-at-top

  modules = []
  original = lowering.lower_jaxpr_to_triton_module

  def keep(*args, **kwargs):
    result = original(*args, **kwargs)
    modules.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  reg.lowering.lower_jaxpr_to_triton_module = keep
  b, t, h, d, e = shape
  dt = jnp.dtype(dtype)
  q = jax.ShapeDtypeStruct((b, t, h, d), dt)
  v = jax.ShapeDtypeStruct((b, t, h, e), dt)
  s0 = jax.ShapeDtypeStruct((b, h, d, e), jnp.float32)
  sl = jax.ShapeDtypeStruct((h,), jnp.float32)

  def fwd(q, k, v, sl, s0):
    return sj.linear.lightning_attention(q, k, v, sl, initial_state=s0,
                                         return_final_state=True,
                                         impl="pallas_triton", tuning=tuning,
                                         chunk_size=chunk)

  grad = jax.grad(lambda *a: sum(x.astype(jnp.float32).sum()
                                 for x in fwd(*a)), argnums=(0, 1, 2, 3, 4))
  dec = lambda q, k, v, s, sl: sj.linear.lightning_decode(
      q, k, v, s, sl, impl="pallas_triton", tuning=tuning)
  texts = []
  with sj.target_platform("gpu", "NVIDIA H200"):
    texts.append(jax.jit(grad).trace(q, q, v, sl, s0).lower(
        lowering_platforms=("cuda",)).as_text())
    bd = decode_batch or b
    qd = jax.ShapeDtypeStruct((bd, h, d), dt)
    vd = jax.ShapeDtypeStruct((bd, h, e), dt)
    sd = jax.ShapeDtypeStruct((bd, h, d, e), jnp.float32)
    texts.append(jax.jit(dec).trace(qd, qd, vd, sd, sl).lower(
        lowering_platforms=("cuda",)).as_text())
  meta = []
  for text in texts:
    meta += re.findall(r'name = "(\w+)", num_stages = (\d+) : i32, '
                       r'num_warps = (\d+) : i32', text)
  jobs = []
  for i, (module, (name, stages, warps)) in enumerate(zip(modules, meta)):
    path = os.path.join(out_dir, f"{i}_{name}.ttir")
    with open(path, "w") as f:
      f.write(module)
    jobs.append(dict(path=path, name=name, stages=int(stages),
                     warps=int(warps)))
  return jobs


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--triton_path", required=True,
                  help="folder holding the `triton` package")
  ap.add_argument("--shape", default="2,16384,16,128,128",
                  help="batch,T,heads,d_k,d_v")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--tuning", default="",
                  help="TuningConfig fields, e.g. forward=split,num_splits=4")
  ap.add_argument("--decode_batch", type=int, default=None,
                  help="batch of the decode step (default: the shape's)")
  ap.add_argument("--chunk", type=int, default=None, help="chunk_size")
  ap.add_argument("--ir", default="", help="folder for IR/PTX/SASS dumps")
  a = ap.parse_args()
  shape = tuple(int(x) for x in a.shape.split(","))
  with tempfile.TemporaryDirectory() as tmp:
    jobs = capture(shape, a.dtype, tmp, parse_tuning(a.tuning),
                   a.decode_batch, a.chunk)
    if a.ir:
      os.makedirs(a.ir, exist_ok=True)
      for job in jobs:
        job["ir"] = os.path.abspath(a.ir)
    spec = os.path.join(tmp, "jobs.json")
    with open(spec, "w") as f:
      json.dump(jobs, f)
    env = dict(os.environ, PYTHONPATH=a.triton_path,
               TRITON_DEFAULT_FP_FUSION="1")
    subprocess.run([sys.executable, "-c", _COMPILE, spec], env=env,
                   check=False)


if __name__ == "__main__":
  main()
