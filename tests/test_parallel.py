"""Every kernel runs per shard under a device mesh (sparsejax.parallel).

The numerics run on 8 forced CPU devices in child processes
(tests/parallel_checks.py; the device count must be set before jax starts):
outputs and gradients on data, tensor, data x tensor and context meshes
against one device, for the xla and interpret-mode Triton paths of
sj.attention and the xla paths of the other wired entry points, plus a
sharded training step. The two parts run at once, one per CPU core. The
CUDA lowering under an abstract mesh shows the Triton kernel's operands at
their per-shard shapes.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import AbstractDevice, AbstractMesh, AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import pytest

import sparsejax as sj
from tests import parallel_checks

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = tuple(parallel_checks.MESHES)
# f32 on both sides; only reduction orders differ (observed <= 7e-7).
TOL = 1e-5


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.parallel_checks", part], cwd=_ROOT,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for part in parallel_checks.PARTS]
  merged = {}
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=600)
      assert proc.returncode == 0, err[-4000:]
      line = [l for l in out.splitlines() if l.startswith("RESULT")][-1]
      for key, value in json.loads(line[len("RESULT"):]).items():
        merged.setdefault(key, {}).update(value)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  return merged


_ATTENTION_LEAVES = {
    "s2_alibi_segments": ("out", "lse", "dq", "dk", "dv", "dslopes"),
    "causal_mqa_softcap": ("out", "lse", "dq", "dk", "dv")}


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("impl", ["xla", "pallas_triton"])
def test_attention_matches_one_device(results, impl, mesh):
  run = results["attention"][impl][mesh]
  want = {f"{c}/{n}" for c, names in _ATTENTION_LEAVES.items()
          for n in names}
  assert set(run["errors"]) == want
  bad = {k: e for k, e in run["errors"].items() if not e <= TOL}
  assert not bad, bad
  # q, k, v and the outputs stay on their shards.
  assert not run["all_gather"]
  # K/V travel a ring over `context` (and only there).
  assert run["ring"] == (mesh == "context")


_OPS_LEAVES = {
    "lightning": ("out0", "d0", "d1", "d2", "d3"),
    "lightning_state": ("out0", "out1", "d0", "d1"),
    "lightning_decode": ("out", "state"),
    "block_bias": ("out0", "d0", "d1", "d2", "d3"),
    "grid_no_bias": ("out",),
    "scatterbrain": ("out0", "d0", "d1", "d2"),
    "block_probs": ("out0", "d0", "d1"),
    "paged_decode": ("out", "scores"),
}
# Scatterbrain's correction cancels: on one device, the same inputs sliced
# to one sequence already move its f32 results by ~5e-5.
_OPS_TOL = {"scatterbrain": 3e-4}


def test_other_entry_points_match_one_device(results):
  """Lightning (with and without initial_state), its decode, MaxViT windows
  (with and without rel_bias), Scatterbrain, block probabilities and paged
  decode, per shard on data x tensor."""
  run = results["ops"]["data_tensor"]
  want = {f"{c}/{n}" for c, names in _OPS_LEAVES.items() for n in names}
  assert set(run["errors"]) == want
  bad = {k: e for k, e in run["errors"].items()
         if not e <= _OPS_TOL.get(k.split("/")[0], TOL)}
  assert not bad, bad
  assert not run["all_gather"]


def test_sharded_training_step_matches_one_device(results):
  """fsdp x tensor x context, Pallas (interpret) attention: two steps and an
  eval against one device."""
  run = results["training"]
  assert run["ring"]  # the kernels ran under the context ring
  # wq [d_model, heads, head_dim]: model dim on fsdp, heads on tensor.
  assert run["wq"] == ["fsdp", "tensor", None]
  assert run["update_norm"] > 0  # the params moved: their check can fail
  errors = run["errors"]
  assert {"loss/step0", "loss/step1", "grad_norm/step1", "eval/loss",
          "params"} <= set(errors)
  bad = {k: e for k, e in errors.items()
         if not e <= (5e-5 if k == "params" else 2e-5)}
  assert not bad, bad


# --- CUDA lowering under an abstract mesh ------------------------------------


def _triton_operands(text):
  """The operand types of every Triton custom call in the lowered text."""
  calls = [l for l in text.splitlines() if "__gpu$xla.gpu.triton" in l]
  return [re.findall(r"\(([^()]*)\) ->", c)[-1].split(", ") for c in calls]


@pytest.mark.parametrize("sizes", [(2, 1, 2, 1), (2, 1, 2, 2)],
                         ids=["data_tensor", "data_tensor_context"])
def test_triton_operands_are_per_shard_for_cuda(sizes):
  b, l, h, hkv, d = 4, 512, 8, 4, 64
  dev = AbstractDevice(device_kind="NVIDIA H200", platform="gpu",
                       num_cores=132)
  mesh = AbstractMesh(sizes, parallel_checks.AXES,
                      axis_types=(AxisType.Auto,) * 4, abstract_device=dev)
  spec = NamedSharding(mesh, P(("data", "fsdp"), "context", "tensor"))
  q = jax.ShapeDtypeStruct((b, l, h, d), jnp.bfloat16, sharding=spec)
  kv = jax.ShapeDtypeStruct((b, l, hkv, d), jnp.bfloat16, sharding=spec)
  mask = sj.masks.s2(l, h, block_size=64, local_blocks=2, vert_stride=2,
                     num_kv_heads=hkv)

  def f(q, k, v):
    loss = lambda *a: sj.attention(*a, mask, impl="pallas_triton").astype(
        jnp.float32).sum()
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  with sj.target_platform("gpu", "NVIDIA H200"), \
      jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(f).trace(q, kv, kv).lower(
        lowering_platforms=("cuda",)).as_text()
  nb, nc, nt = sizes[0], sizes[3], sizes[2]
  local = {f"tensor<{b // nb}x{l // nc}x{n // nt}x{d}xbf16>" for n in (h, hkv)}
  calls = _triton_operands(text)
  assert len(calls) >= 3  # forward, dQ, dK/dV (per ring step with context)
  for operands in calls:
    blocks = [t for t in operands if t.endswith("bf16>")]
    assert blocks and set(blocks) <= local, (operands, local)
  assert "all_gather" not in text and "all-gather" not in text
  assert ("collective_permute" in text) == (nc > 1)
