r"""Registers, spills and shared memory of the lightning Triton kernels for
sm90, compiled on a CPU-only machine.

Pallas lowers each kernel to Triton IR (jaxlib's lowering); the `triton`
package (not a sparsejax dependency: install it aside, e.g.
`pip install --no-deps --target /tmp/tritonpkg triton==3.9.0`) compiles that
IR for an H100/H200 target without a GPU, and cuobjdump reports the
resources. The GPU's own Triton (bundled in jaxlib) may differ slightly; this
is the check that a tile choice fits before spending GPU time.

  python benchmarks/linear/triton_resources.py --triton_path=/tmp/tritonpkg \
      --shape=2,16384,16,128,128 --dtype=bfloat16
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
from triton.backends.compiler import GPUTarget
jobs = json.load(open(sys.argv[1]))
tools = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
for job in jobs:
  try:
    k = triton.compile(job["path"], target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=job["warps"],
                                    num_stages=job["stages"]))
    cubin = job["path"] + ".cubin"
    open(cubin, "wb").write(k.asm["cubin"])
    use = subprocess.run([os.path.join(tools, "cuobjdump"),
                          "--dump-resource-usage", cubin],
                         capture_output=True, text=True).stdout
    reg = re.search(r"REG:(\d+)", use).group(1)
    stack = re.search(r"STACK:(\d+)", use).group(1)
    print(f"{job['name']:30s} warps {job['warps']:2d} stages "
          f"{job['stages']}: {reg:>3s} registers, {stack:>5s} B stack "
          f"(spills), {k.metadata.shared / 1024:6.1f} KB shared, "
          f"{k.asm['ptx'].count('wgmma.mma_async')} wgmma")
  except Exception as e:  # report and go on
    print(f"{job['name']}: FAILED {type(e).__name__}: {str(e)[:500]}")
'''


def capture(shape, dtype, out_dir):
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
                                         impl="pallas_triton")

  grad = jax.grad(lambda *a: sum(x.astype(jnp.float32).sum()
                                 for x in fwd(*a)), argnums=(0, 1, 2, 3, 4))
  dec = lambda q, k, v, s, sl: sj.linear.lightning_decode(
      q, k, v, s, sl, impl="pallas_triton")
  texts = []
  with sj.target_platform("gpu", "NVIDIA H200"):
    texts.append(jax.jit(grad).trace(q, q, v, sl, s0).lower(
        lowering_platforms=("cuda",)).as_text())
    qd = jax.ShapeDtypeStruct((b, h, d), dt)
    vd = jax.ShapeDtypeStruct((b, h, e), dt)
    texts.append(jax.jit(dec).trace(qd, qd, vd, s0, sl).lower(
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
  a = ap.parse_args()
  shape = tuple(int(x) for x in a.shape.split(","))
  with tempfile.TemporaryDirectory() as tmp:
    jobs = capture(shape, a.dtype, tmp)
    spec = os.path.join(tmp, "jobs.json")
    with open(spec, "w") as f:
      json.dump(jobs, f)
    env = dict(os.environ, PYTHONPATH=a.triton_path,
               TRITON_DEFAULT_FP_FUSION="1")
    subprocess.run([sys.executable, "-c", _COMPILE, spec], env=env,
                   check=False)


if __name__ == "__main__":
  main()
