r"""Issue 18 on one H200: score-mod overhead and packed-document training.

  PYTHONPATH=$PWD python benchmarks/core/bench_core.py --out=OUT/core.json
  PYTHONPATH=$PWD python benchmarks/core/bench_core.py --smoke \
      --impls=xla --out=/tmp/core.json  # CPU

Part 1, attention (bf16, B1, H32, d128; random normal inputs): no mod vs
Alibi vs RelativeBias(W=128) on S2 32K (block 128, local 8, stride 8) and
dense causal 16K, forward and forward+backward (the backward includes the
mod's parameter gradient), for pallas_triton, and pallas_mosaic_gpu without
a mod as the reference point. Median of `--repeats` device-synchronised
calls after warm-up. The backward runs twice more to check that the table
gradient is bit-identical (deterministic: no atomics).

Part 2, training tokens/s of a small S2 LM at 8K context (bf16) on the
stdlib text corpus, data.pack=True (segment ids + per-document positions)
vs pack=False (one plain stream), through the main job's Experiment and
train_step, both on pallas_triton (Mosaic GPU has no segment ids yet).
Both train steps compile ahead of time in background threads while part 1
compiles.

Everything compiles first (in threads); with --wait_pid the timing waits
for that process (the GPU tests running beside the compiles) to exit.
"""

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import sparsejax as sj
from sparsejax import benchmark
from sparsejax.training import aot


def _log(*a):
  print(*a, flush=True)


def attention_problems(a):
  """[(case, mask, seq)] of part 1."""
  if a.smoke:
    return [("s2", sj.masks.s2(1024, a.heads, block_size=64, local_blocks=2,
                               vert_stride=4), 1024),
            ("dense_causal", sj.masks.causal(512, block_size=64), 512)]
  return [("s2", sj.masks.s2(32768, a.heads, block_size=128, local_blocks=8,
                             vert_stride=8), 32768),
          ("dense_causal", sj.masks.causal(16384, block_size=128), 16384)]


def mods(a):
  """name -> (constructor, parameter array)."""
  w = a.window
  key = jax.random.key(7)
  return {
      "none": (None, jnp.zeros((a.heads,), jnp.float32)),
      "alibi": (sj.score_mods.Alibi,
                sj.score_mods.Alibi.geometric_slopes(a.heads)),
      f"relative_bias_w{w}": (sj.score_mods.RelativeBias, 0.1 *
                              jax.random.normal(key, (a.heads, 2 * w - 1))),
  }


def _fns(mask, make, impl):
  def attn(q, k, v, p):
    return sj.attention(q, k, v, mask, impl=impl,
                        score_mod=None if make is None else make(p))

  def fwdbwd(q, k, v, p, do):
    _, vjp = jax.vjp(attn, q, k, v, p)
    return vjp(do)

  return jax.jit(attn), jax.jit(fwdbwd)


def attention_jobs(a):
  """Inputs and jitted functions of part 1 (built before any compile runs:
  the compiler traces on its own thread)."""
  jobs = []
  impls = a.impls.split(",")
  for case, mask, seq in attention_problems(a):
    q, k, v, do = benchmark.random_inputs(1, seq, a.heads, a.heads,
                                          a.head_dim, jnp.dtype(a.dtype))
    for impl in impls:
      for mod_name, (make, param) in mods(a).items():
        if impl == "pallas_mosaic_gpu" and make is not None:
          continue  # the reference point: Mosaic GPU has no mods yet
        fwd, fwdbwd = _fns(mask, make, impl)
        jobs.append(dict(key=(case, impl, mod_name), fwd=fwd, fwdbwd=fwdbwd,
                         args=(q, k, v, param), do=do, mask=mask, seq=seq,
                         has_mod=make is not None))
  return jobs


def submit_attention(compiler, jobs):
  for job in jobs:
    compiler.submit(job["key"] + ("fwd",), job["fwd"], *job["args"])
    compiler.submit(job["key"] + ("fwdbwd",), job["fwdbwd"], *job["args"],
                    job["do"])


def time_attention(a, compiler, jobs):
  rows, visible = [], {}
  for job in jobs:
    case, impl, mod_name = job["key"]
    if case not in visible:
      visible[case] = benchmark.visible_entries(job["mask"], 1, a.heads)
    row = dict(case=case, seq=job["seq"], impl=impl, mod=mod_name,
               visible_fraction=visible[case] / (a.heads * job["seq"] ** 2))
    try:
      fwd = compiler.get(job["key"] + ("fwd",))
      fwdbwd = compiler.get(job["key"] + ("fwdbwd",))
      args = job["args"]
      out = fwd(*args)
      row["out_finite"] = bool(jnp.isfinite(out.astype(jnp.float32)).all())
      row["fwd_ms"] = benchmark.median_ms(fwd, args, a.warmup, a.repeats)
      row["fwdbwd_ms"] = benchmark.median_ms(fwdbwd, args + (job["do"],),
                                             a.warmup, a.repeats)
      flops = 4 * visible[case] * a.head_dim
      row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
      row["fwdbwd_tflops"] = (benchmark.BWD_FLOP_FACTOR * flops /
                              row["fwdbwd_ms"] / 1e9)
      if job["has_mod"]:
        g1 = np.asarray(fwdbwd(*args, job["do"])[3])
        g2 = np.asarray(fwdbwd(*args, job["do"])[3])
        row["param_grad_bit_identical"] = bool(np.array_equal(g1, g2))
        row["param_grad_finite"] = bool(np.isfinite(g1).all())
        row["param_grad_norm"] = float(np.linalg.norm(g1))
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    base = next((r for r in rows if r["case"] == case and r["impl"] == impl
                 and r["mod"] == "none" and "fwd_ms" in r), None)
    if base is not None and "fwd_ms" in row:
      row["fwd_overhead"] = row["fwd_ms"] / base["fwd_ms"] - 1
      row["fwdbwd_overhead"] = row["fwdbwd_ms"] / base["fwdbwd_ms"] - 1
    _log(json.dumps(row))
    rows.append(row)
  return rows


def train_config(a, pack: bool):
  from configs import lm as lm_config  # pylint: disable=g-import-not-at-top
  config = lm_config.get_config("attention=s2" + (",small" if a.smoke else
                                                  ""))
  config.unlock()
  config.data.pack = pack
  config.dtype = "bfloat16"
  config.progress_bar = False
  if a.smoke:
    config.seq_len, config.batch_size = 256, 2
  else:
    config.seq_len, config.batch_size = 8192, 2
    config.model.update(d_model=512, num_layers=4, num_heads=8,
                        num_kv_heads=4)
    config.attention.options.update(block_size=128, local_blocks=4,
                                    vert_stride=4)
    # Both runs on the Triton kernel: Mosaic GPU has no segment ids yet, so
    # "auto" would compare two kernels rather than packing.
    config.attention.impl = "pallas_triton"
  return config


def training_runs(a):
  """Experiments, states and first batches of part 2 (pack False, True)."""
  from sparsejax import training  # pylint: disable=g-import-not-at-top
  from sparsejax.training import sharding  # pylint: disable=g-import-not-at-top
  runs = []
  for pack in (False, True):
    config = train_config(a, pack)
    exp = training.Experiment(config)
    it = exp.iterator("train", batch_size=config.batch_size)
    state = exp.init_state(exp.params)
    batch = sharding.shard_batch(next(it), exp.mesh)
    runs.append(dict(pack=pack, config=config, exp=exp, it=it, state=state,
                     batch=batch))
  return runs


def submit_training(compiler, runs):
  for run in runs:
    compiler.submit(("train", run["pack"]), run["exp"].train_step,
                    run["state"], run["exp"].consts, run["batch"])


def time_training(a, compiler, runs):
  from sparsejax.training import sharding  # pylint: disable=g-import-not-at-top
  rows = []
  for run in runs:
    exp, config = run["exp"], run["config"]
    row = dict(pack=run["pack"], impl=config.attention.get("impl", "auto"),
               seq_len=config.seq_len,
               batch_size=config.batch_size, steps=a.train_steps)
    try:
      step = compiler.get(("train", run["pack"]))
      state, batch, times, losses = run["state"], run["batch"], [], []
      masked = []
      for i in range(a.train_steps):
        t0 = time.perf_counter()
        state, metrics = step(state, exp.consts, batch)
        loss = float(metrics["loss"])  # syncs the device
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        host = next(run["it"])
        masked.append(1.0 - float(np.mean(host["loss_mask"])))
        batch = sharding.shard_batch(host, exp.mesh)
        del i
      steady = times[min(3, len(times) - 1):]
      tokens = config.batch_size * config.seq_len
      row.update(step_ms=1e3 * statistics.median(steady),
                 tokens_per_s=tokens / statistics.median(steady),
                 first_loss=losses[0], last_loss=losses[-1],
                 masked_target_fraction=float(np.mean(masked)))
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    _log(json.dumps(row))
    rows.append(row)
  return rows


def _wait(pid: int, limit_s: float):
  start = time.time()
  while pid and time.time() - start < limit_s:
    try:
      os.kill(pid, 0)
    except OSError:
      return
    time.sleep(0.5)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--impls", default="pallas_triton,pallas_mosaic_gpu")
  ap.add_argument("--heads", type=int, default=32)
  ap.add_argument("--head_dim", type=int, default=128)
  ap.add_argument("--window", type=int, default=128)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--train_steps", type=int, default=30)
  ap.add_argument("--parts", default="attention,train")
  ap.add_argument("--wait_pid", type=int, default=0)
  ap.add_argument("--smoke", action="store_true",
                  help="CPU sizes (use --impls=xla)")
  a = ap.parse_args()
  if a.smoke:
    a.heads, a.head_dim, a.window = 4, 64, 16
    a.warmup, a.repeats, a.train_steps = 0, 1, 4
  parts = a.parts.split(",")
  _log("devices:", jax.devices())
  t0 = time.time()
  jobs = attention_jobs(a) if "attention" in parts else []
  runs = training_runs(a) if "train" in parts else []
  compiler = aot.Compiler()
  submit_attention(compiler, jobs)
  submit_training(compiler, runs)
  compiler.close()  # every executable is compiled (errors stay with get)
  _log(f"compiled in {time.time() - t0:.1f} s: "
       f"{json.dumps({str(k): v for k, v in compiler.seconds.items()})}")
  _wait(a.wait_pid, 120)
  result = dict(device=str(jax.devices()[0].device_kind),
                jax=jax.__version__, attention=[], train=[])
  result["attention"] = time_attention(a, compiler, jobs)
  result["train"] = time_training(a, compiler, runs)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(result, f, indent=1)
  _log(f"wrote {a.out} after {time.time() - t0:.1f} s")


if __name__ == "__main__":
  main()
