"""Sharded training on 8 forced CPU devices matches one device.

The device count flag must be set before jax initialises, so the check runs
in a fresh subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import json, tempfile
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from tests.test_training import tiny_config
    from sparsejax import training

    assert jax.device_count() == 8, jax.devices()
    def run(devices, mesh):
      config = tiny_config(**{"mesh.data": mesh[0], "mesh.fsdp": mesh[1],
                              "mesh.tensor": mesh[2], "batch_size": 8,
                              "eval_batch_size": 8, "model.d_model": 64})
      exp = training.Experiment(config, devices)
      specs = {jax.tree_util.keystr(p): s.spec for p, s in
               jax.tree_util.tree_flatten_with_path(exp.state_shardings)[0]}
      wq = [v for k, v in specs.items() if "params" in k and "'wq'" in k][0]
      with tempfile.TemporaryDirectory() as workdir:
        out = training.train_and_evaluate(config, workdir, devices=devices)
      return dict(history=out["history"], eval=out["eval"], wq=list(wq))
    one = run(jax.devices()[:1], (1, 1, 1))
    many = run(jax.devices(), (2, 2, 2))
    print("RESULT" + json.dumps(dict(one=one, many=many)))
""")


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


def test_params_are_sharded_on_heads(results):
  # wq is [d_model, heads, head_dim]: model dim on fsdp, heads on tensor.
  assert results["many"]["wq"] == ["fsdp", "tensor", None]


def test_sharded_losses_match_one_device(results):
  one, many = results["one"], results["many"]
  assert [s for s, _ in one["history"]] == [s for s, _ in many["history"]]
  # Only the reduction order differs between the two runs.
  for (_, a), (_, b) in zip(one["history"], many["history"]):
    assert abs(a - b) <= 2e-5 * abs(a), (one["history"], many["history"])
  for key in one["eval"]:
    assert abs(one["eval"][key] - many["eval"][key]) <= 2e-5 * abs(
        one["eval"][key])
