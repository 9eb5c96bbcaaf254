"""Sharded runs on 8 forced CPU devices against one device (a child process).

`python -m tests.parallel_checks` needs
XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax starts,
hence the subprocess in test_parallel.py) and prints one RESULT line of
JSON: per implementation and mesh, the largest error of every output and
gradient relative to the single-device run's magnitude, whether the
compiled program all-gathers, and the kernel's operand shapes.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

jax.config.update("jax_default_matmul_precision", "highest")
# Halves XLA's compile time here (the runs are tiny); both sides of every
# comparison compile the same way.
jax.config.update("jax_disable_most_optimizations", True)

import sparsejax as sj  # pylint: disable=g-import-not-at-top,wrong-import-position

AXES = ("data", "fsdp", "tensor", "context")
# Mesh sizes per sharding the issue names (data, tensor, both, context).
MESHES = {"data": (2, 1, 1, 1), "tensor": (1, 1, 2, 1),
          "data_tensor": (2, 1, 2, 1), "context": (1, 1, 1, 2)}
B, L, H, HKV, D, BLOCK = 2, 64, 4, 2, 16, 16


def _mesh(sizes):
  n = int(np.prod(sizes))
  return jax.make_mesh(sizes, AXES, devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)


def _inputs():
  ks = jax.random.split(jax.random.key(0), 9)
  q = jax.random.normal(ks[0], (B, L, H, D))
  k = jax.random.normal(ks[1], (B, L, HKV, D))
  v = jax.random.normal(ks[2], (B, L, HKV, D))
  k1 = jax.random.normal(ks[3], (B, L, 1, D))  # MQA: kv replicated
  v1 = jax.random.normal(ks[4], (B, L, 1, D))
  do = jax.random.normal(ks[5], (B, L, H, D))
  dlse = jax.random.normal(ks[6], (B, H, L))
  slopes = jax.random.uniform(ks[7], (H,), minval=0.05, maxval=0.5)
  # Packed documents: boundaries inside blocks and across the shards.
  ids = np.stack([np.repeat([0, 1, 2], [20, 30, 14]),
                  np.repeat([0, 1], [41, 23])]).astype(np.int32)
  return dict(q=q, k=k, v=v, k1=k1, v1=v1, do=do, dlse=dlse, slopes=slopes,
              ids=jnp.asarray(ids))


# Layouts of the inputs on the mesh (how a model would hold them).
_SPECS = dict(q=P(("data", "fsdp"), "context", "tensor"),
              k=P(("data", "fsdp"), "context", "tensor"),
              v=P(("data", "fsdp"), "context", "tensor"),
              k1=P(("data", "fsdp"), "context"),
              v1=P(("data", "fsdp"), "context"),
              do=P(("data", "fsdp"), "context", "tensor"),
              dlse=P(("data", "fsdp"), "tensor", "context"),
              slopes=P(), ids=P(("data", "fsdp"), "context"))


def _program(impl):
  interpret = impl != "xla"
  s2 = sj.masks.s2(L, H, block_size=BLOCK, local_blocks=2, vert_stride=3,
                   num_kv_heads=HKV)
  causal = sj.masks.causal(L, block_size=BLOCK)

  def f(x):
    def s2_case(q, k, v, slopes):
      return sj.attention(q, k, v, s2, score_mod=sj.score_mods.Alibi(slopes),
                          q_segment_ids=x["ids"], impl=impl,
                          interpret=interpret, return_lse=True)

    def mqa_case(q, k, v):
      return sj.attention(q, k, v, causal, soft_cap=20.0, impl=impl,
                          interpret=interpret, return_lse=True)

    out = {}
    (o, lse), vjp = jax.vjp(s2_case, x["q"], x["k"], x["v"], x["slopes"])
    out["s2_alibi_segments"] = dict(
        zip(("out", "lse", "dq", "dk", "dv", "dslopes"),
            (o, lse) + vjp((x["do"], x["dlse"]))))
    (o, lse), vjp = jax.vjp(mqa_case, x["q"], x["k1"], x["v1"])
    out["causal_mqa_softcap"] = dict(
        zip(("out", "lse", "dq", "dk", "dv"),
            (o, lse) + vjp((x["do"], x["dlse"]))))
    return out

  return f


def _errors(got, ref):
  out = {}
  for case, leaves in ref.items():
    for name, r in leaves.items():
      r, g = np.asarray(r), np.asarray(got[case][name])
      fin = np.isfinite(r)
      same_inf = bool(np.array_equal(fin, np.isfinite(g)))
      scale = max(float(np.max(np.abs(r[fin]), initial=0.0)), 1e-30)
      err = float(np.max(np.abs(np.where(fin, g - r, 0.0)), initial=0.0))
      out[f"{case}/{name}"] = err / scale if same_inf else float("inf")
  return out


def _compare(f, x, specs, meshes):
  """f(x) jitted on one device, then on each mesh with x placed by specs:
  {mesh: errors, whether the program all-gathers or has a ring}."""
  start = time.time()
  ref = jax.device_get(jax.jit(f)(x))
  results = {"single": dict(seconds=time.time() - start)}
  for name, sizes in meshes.items():
    start = time.time()
    mesh = _mesh(sizes)
    xs = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
                      x, specs)
    with jax.set_mesh(mesh):
      compiled = jax.jit(f).lower(xs).compile()
      got = jax.device_get(compiled(xs))
    text = compiled.as_text()
    results[name] = dict(
        errors=_errors(got, ref), all_gather="all-gather" in text,
        ring="collective-permute" in text, seconds=time.time() - start)
  return results


def attention_checks(impl):
  x = _inputs()
  return _compare(_program(impl), x, {k: _SPECS[k] for k in x}, MESHES)


# --- the other ops' entry points (per_shard wiring), xla on data x tensor ----


def _ops_program():
  """Each wired entry point on its xla path: outputs, and gradients where
  the op has a backward; None operands (initial_state, rel_bias) too."""
  VisitList = sj.inference.VisitList

  causal = sj.masks.causal(L, block_size=BLOCK)

  def grads(fn, args, ct):
    out, vjp = jax.vjp(fn, *args)
    outs = out if isinstance(out, tuple) else (out,)
    return dict(**{f"out{i}": o for i, o in enumerate(outs)},
                **{f"d{i}": g for i, g in enumerate(vjp(ct))})

  def f(x):
    q, k, v, slopes = x["q"], x["k"], x["v"], x["slopes"]
    kv, vh = x["kv"], x["vh"]  # all heads (linear, vision)
    img = lambda a: a.reshape(B, 8, 8, H, D)
    lists = VisitList(*x["lists"])
    return {
        "lightning": grads(lambda q, k, v, s: sj.linear.lightning_attention(
            q, k, v, s, chunk_size=16, impl="xla"), (q, kv, vh, slopes),
                           x["do"]),
        "lightning_state": grads(
            lambda q, s0: sj.linear.lightning_attention(
                q, kv, vh, slopes, initial_state=s0, chunk_size=16,
                return_final_state=True, impl="xla"), (q, x["state"]),
            (x["do"], x["state"])),
        "lightning_decode": dict(zip(("out", "state"),
                                     sj.linear.lightning_decode(
                                         q[:, 0], kv[:, 0], vh[:, 0],
                                         x["state"], slopes, impl="xla"))),
        "block_bias": grads(lambda q, k, v, t: sj.vision.block_attention(
            q, k, v, (4, 4), rel_bias=t, impl="xla"),
                            (img(q), img(kv), img(vh), x["table"]),
                            img(x["do"])),
        "grid_no_bias": dict(out=sj.vision.grid_attention(
            img(q), img(kv), img(vh), (4, 4), impl="xla")),
        "scatterbrain": grads(
            lambda q, k, v: sj.lowrank.scatterbrain_attention(
                q, k, v, causal, x["projection"], causal=True, impl="xla"),
            (q, k, v), x["do"]),
        "block_probs": grads(lambda q, k: sj.learned.block_attention_probs(
            q, k, block_size=BLOCK, impl="xla"), (q, k), x["dprobs"]),
        "paged_decode": dict(zip(("out", "scores"),
                                 sj.inference.paged_decode_attention(
                                     q[:, 0], x["k_pages"], x["v_pages"],
                                     lists, impl="xla",
                                     return_scores=True))),
    }

  return f


def ops_checks():
  base = _inputs()
  ks = jax.random.split(jax.random.key(1), 8)
  pages, width = 8, 3
  # Per (sequence, kv head): 3 distinct pool pages, the last one partly.
  phys = np.stack([np.stack([np.random.RandomState(4 * i + j).permutation(
      pages)[:width] for j in range(HKV)]) for i in range(B)]).astype(np.int32)
  logical = np.broadcast_to(np.arange(width, dtype=np.int32), phys.shape)
  x = dict(
      q=base["q"], k=base["k"], v=base["v"], do=base["do"],
      slopes=base["slopes"], kv=jax.random.normal(ks[0], (B, L, H, D)),
      vh=jax.random.normal(ks[6], (B, L, H, D)),
      v_pages=jax.random.normal(ks[7], (HKV, pages, 4, D)),
      state=jax.random.normal(ks[1], (B, H, D, D)),
      table=jax.random.normal(ks[2], (H, 7, 7)),
      projection=sj.lowrank.orthogonal_gaussian_projection(ks[3], 16, D),
      dprobs=jax.random.normal(ks[4], (B, H, L // BLOCK, L // BLOCK)),
      k_pages=jax.random.normal(ks[5], (HKV, pages, 4, D)),
      lists=(jnp.asarray(phys), jnp.asarray(logical),
             jnp.full((B, HKV), width, jnp.int32),
             jnp.asarray([[10, 11], [9, 12]], jnp.int32)))
  bht = P("data", None, "tensor")
  specs = dict(q=bht, k=bht, v=bht, do=bht, kv=bht, vh=bht,
               slopes=P("tensor"), v_pages=P("tensor"),
               state=P("data", "tensor"), table=P("tensor"), projection=P(),
               dprobs=P("data", "tensor"), k_pages=P("tensor"),
               lists=(P("data", "tensor"),) * 4)
  return _compare(_ops_program(), x, specs,
                  {"data_tensor": MESHES["data_tensor"]})


def training_checks():
  """Two sharded train steps and one eval step with the Pallas path
  (interpret mode) on fsdp x tensor x context against one device: losses,
  gradient norms, eval metrics and the updated params (the first step's
  learning rate is 0, the warmup's start)."""
  from sparsejax import training  # pylint: disable=g-import-not-at-top
  from sparsejax.training import sharding  # pylint: disable=g-import-not-at-top
  from tests.test_training import tiny_config  # pylint: disable=g-import-not-at-top

  def run(devices, mesh):
    config = tiny_config(**{
        "mesh.data": 1, "mesh.fsdp": mesh[0], "mesh.tensor": mesh[1],
        "mesh.context": mesh[2], "attention.impl": "pallas_triton",
        "attention.interpret": True})
    exp = training.Experiment(config, devices)
    state = exp.init_state(exp.params)
    batch = sharding.shard_batch(
        next(exp.iterator("train", batch_size=config.batch_size)), exp.mesh)
    text = exp.train_step.lower(state, exp.consts, batch).compile().as_text()
    metrics = []
    for _ in range(2):
      state, m = exp.train_step(state, exp.consts, batch)
      metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    specs = {jax.tree_util.keystr(p): s.spec for p, s in
             jax.tree_util.tree_flatten_with_path(exp.state_shardings)[0]}
    wq = [v for k, v in specs.items() if "params" in k and "'wq'" in k][0]
    return dict(metrics=metrics,
                eval=exp.evaluate(state["params"], state.get("model_state")),
                params=jax.device_get(state["params"]), wq=list(wq),
                ring="collective-permute" in text)

  start = time.time()
  one = run(jax.devices()[:1], (1, 1, 1))
  many = run(jax.devices(), (2, 2, 2))
  rel = lambda a, b: abs(a - b) / max(abs(a), 1e-30)
  out = {f"{key}/step{i}": rel(a[key], b[key])
         for key in ("loss", "grad_norm")
         for i, (a, b) in enumerate(zip(one["metrics"], many["metrics"]))}
  out.update({f"eval/{k}": rel(v, many["eval"][k])
              for k, v in one["eval"].items()})
  out["params"] = max(
      float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))
      for a, b in zip(jax.tree.leaves(one["params"]),
                      jax.tree.leaves(many["params"])))
  return dict(errors=out, wq=many["wq"], ring=many["ring"],
              update_norm=one["metrics"][-1]["update_norm"],
              seconds=time.time() - start)


# Parts: test_parallel.py runs them in two processes at once (2 cores).
PARTS = {
    "xla": lambda: dict(attention={"xla": attention_checks("xla")},
                        ops=ops_checks()),
    "pallas_triton": lambda: dict(
        attention={"pallas_triton": attention_checks("pallas_triton")},
        training=training_checks()),
}


def main(argv):
  assert jax.device_count() == 8, jax.devices()
  result = {}
  for part in argv or list(PARTS):
    for key, value in PARTS[part]().items():
      result.setdefault(key, {}).update(value)
  print("RESULT" + json.dumps(result))
  sys.stdout.flush()


if __name__ == "__main__":
  main(sys.argv[1:])
