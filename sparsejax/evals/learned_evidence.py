"""Quality evidence for the learned family on one small needle LM.

  out = learned_evidence.run(lm.get_config, PRESETS["gpu"], out_dir)

Three 4-layer LMs train in lockstep on needles generated on the fly (the
same init, batches and steps; `needle_long`'s curriculum: the shortest
length first, then longer ones unlock): dense, local-only (a causal sliding
window) and the Routing Transformer hybrid (local heads beside k-means
routing heads, the centroids updated by the train step). Then, reusing the
trained dense model:

* SeerAttention: the gates are distilled on it (base frozen, the KL loss,
  `trainable="attn/gate/"`), then the needle accuracy and the answer loss are
  measured at causal block densities 0.5 -> 0.1 (sparsity 50% -> 90%).
* MInference: an offline per-head pattern search on calibration needles,
  then the needle accuracy with MInference prefill (searched patterns, and
  one fixed vertical-slash budget) against dense prefill.

Every variant is evaluated at `eval_length` on the same needles (exact
match of the answer, and its cross-entropy: the "loss" of a needle model).
Compiles run in background threads (`training.aot`); `max_seconds` bounds
the whole run but the training's waits for its compiles (they vary with the
host), training stopping early to leave `reserve_s` for the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Mapping, Optional
import warnings

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax import data
from sparsejax import nn
from sparsejax.evals import compare
from sparsejax.evals import needle
from sparsejax.evals import needle_long
from sparsejax.learned import minference
from sparsejax.nn import learned_layers
from sparsejax.nn.layers import StepState
from sparsejax.training import aot
from sparsejax.training import checkpoints
from sparsejax.training import optimizer as optimizer_lib
from sparsejax.training import tasks
from sparsejax.training import train

JSON_NAME = "learned_evidence.json"
VALUE_LEN = needle_long.VALUE_LEN
SEER_TRAINABLE = "attn/gate/"


@dataclasses.dataclass(frozen=True)
class Preset:
  """Model, schedule, method settings and time budget of one run."""
  model: Mapping[str, Any]  # configs/lm.py overrides, dotted paths
  train_lengths: tuple[int, ...]  # ascending; the last is eval_length
  tokens_per_step: int
  steps: int
  unlock_frac: float
  dense_block: int
  local_window: int
  routing: Mapping[str, Any]  # routing_transformer options
  seer: Mapping[str, Any]  # seer options (mode/density set per use)
  seer_densities: tuple[float, ...]
  distill_steps: int
  distill_lr: float
  minference_candidates: tuple[str, ...]
  minference_fixed: str
  minference_recall: float
  calib_examples: int
  eval_examples: int  # needles per depth
  eval_batch: int
  max_seconds: float
  reserve_s: float  # kept back from training for distillation and eval
  depths: tuple[float, ...] = needle.DEFAULT_DEPTHS
  log_every: int = 25
  seed: int = 0

  @property
  def eval_length(self) -> int:
    return self.train_lengths[-1]


PRESETS = {
    # One H200, bf16, about 2.5 minutes with compiles: 4 layers, d_model 256,
    # 4 heads of 64; routing: 2 of 4 heads, 16 clusters (512 tokens each at
    # 8K, the paper's pg19 setting) beside a 512-token window.
    "gpu": Preset(
        model={"dtype": "bfloat16", "model.num_layers": 4,
               "model.d_model": 256, "model.mlp_dim": 1024,
               "model.num_heads": 4, "model.num_kv_heads": 4,
               "model.rope_theta": 5e5, "optimizer.learning_rate": 2e-3},
        train_lengths=(256, 2048, 8192), tokens_per_step=32768, steps=2000,
        unlock_frac=0.5, dense_block=128, local_window=512,
        routing=dict(routing_heads=2, num_clusters=16, window=0,
                     local_window=512, block_size=128, decay=0.999,
                     commitment=1e-4, share_qk=True),
        seer=dict(block_size=64, gate_hidden=64, last_dense_blocks=2,
                  gate_loss_scale=10.0, threshold=0.0),
        seer_densities=(0.5, 0.3, 0.2, 0.1), distill_steps=200,
        distill_lr=3e-3,
        minference_candidates=(
            "a_shape:64:512", "vertical_slash:64:512",
            "vertical_slash:128:1024", "vertical_slash:512:1024",
            "vertical_slash:1024:2048", "block_sparse:16", "dense"),
        minference_fixed="vertical_slash:256:1024", minference_recall=0.95,
        calib_examples=2, eval_examples=32, eval_batch=8, max_seconds=150,
        reserve_s=55),
    # Two CPU cores, float32: the code path only (about 2 minutes).
    "smoke": Preset(
        model={"dtype": "float32", "model.num_layers": 2, "model.d_model": 32,
               "model.mlp_dim": 64, "model.num_heads": 2,
               "model.num_kv_heads": 2, "optimizer.learning_rate": 3e-3},
        train_lengths=(64, 128), tokens_per_step=512, steps=8,
        unlock_frac=0.5, dense_block=16, local_window=32,
        routing=dict(routing_heads=1, num_clusters=4, window=0,
                     local_window=32, block_size=16, decay=0.99,
                     commitment=1e-4, share_qk=True),
        seer=dict(block_size=16, gate_hidden=16, last_dense_blocks=1,
                  gate_loss_scale=10.0, threshold=0.0),
        seer_densities=(0.5, 0.1), distill_steps=4, distill_lr=1e-2,
        minference_candidates=("a_shape:16:32", "vertical_slash:16:32",
                               "dense"),
        minference_fixed="vertical_slash:16:32", minference_recall=0.9,
        calib_examples=1, eval_examples=2, eval_batch=2, max_seconds=400,
        reserve_s=200, log_every=4),
}


def variants(preset: Preset) -> list[compare.Variant]:
  """The three trained variants (same shapes of params: one init)."""
  return [
      compare.Variant("dense", "attention=dense,task=needle",
                      {"attention.options": dict(
                          block_size=preset.dense_block)}),
      compare.Variant("local", "attention=sliding_window,task=needle",
                      {"attention.options": dict(
                          window=preset.local_window,
                          block_size=preset.dense_block)}),
      compare.Variant("routing_transformer",
                      "attention=routing_transformer,task=needle",
                      {"attention.options": dict(preset.routing)}),
  ]


def _needle_preset(preset: Preset) -> needle_long.Preset:
  """needle_long's schedule and batches for this preset."""
  return needle_long.Preset(
      model={}, s2_options={}, dense_block=preset.dense_block,
      train_lengths=preset.train_lengths,
      tokens_per_step=preset.tokens_per_step, steps=preset.steps,
      unlock_frac=preset.unlock_frac, eval_lengths=(preset.eval_length,),
      eval_examples=preset.eval_examples, eval_batch=preset.eval_batch,
      max_minutes=preset.max_seconds / 60, eval_reserve_s=preset.reserve_s,
      seed=preset.seed)


class _Model:
  """A variant: state and, per length, (graphdef, consts)."""

  def __init__(self, name, config, lengths, *, trainable=None, params=None):
    self.name, self.config, self.trainable = name, config, trainable
    info = data.task_info(config.data)
    self.graphdefs, self.consts = {}, {}
    for length in lengths:
      model = nn.build_model(needle.with_seq_len(config, length), info,
                             seed=config.seed)
      self.graphdefs[length], p, model_state, self.consts[length] = (
          nnx.split(model, nnx.Param, StepState, ...))
    if params is not None:  # start from a copy: this model's steps donate
      p = _with_params(p, jax.tree.map(jnp.copy, params))
    self.num_params = int(sum(x.size for x in jax.tree.leaves(p)))
    self.tx = optimizer_lib.make_optimizer(config.optimizer)
    self.state = train.init_state(self.tx, p, model_state, trainable)

  def step_fn(self, length):
    return jax.jit(functools.partial(
        train.train_step, self.graphdefs[length], self.tx,
        tasks.get_task("lm"), trainable=self.trainable), donate_argnums=(0,))


def answer_stats(graphdef, params, consts, inputs, targets):
  """Per example: answer cross-entropy (nats, summed over the answer),
  exact match, and the mean density the sparse layers kept (1 if none)."""
  model = nnx.merge(graphdef, params, *consts)
  logits = model(inputs)[:, -VALUE_LEN:]
  answer = targets[:, -VALUE_LEN:]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, answer).sum(-1)
  match = (logits.argmax(-1) == answer).all(-1)
  kept = [x for x in jax.tree.leaves(nnx.state(model, nnx.Intermediate))]
  density = jnp.mean(jnp.stack(kept)) if kept else jnp.ones(())
  return ce, match, density


def eval_batches(preset: Preset):
  """The eval needles: (depth, inputs, targets) batches, fixed seeds."""
  out = []
  for di, depth in enumerate(preset.depths):
    for start in range(0, preset.eval_examples, preset.eval_batch):
      batch = data.make_needle_batch(
          preset.seed * 1_000_003 + di * 7919 + start, preset.eval_batch,
          preset.eval_length, depth, value_len=VALUE_LEN)
      out.append((depth, batch["inputs"], batch["targets"]))
  return out


def _spec(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def layer_qk(model, tokens):
  """Per layer (q, k) after RoPE [B, L, H, D] of a causal LM's forward."""
  x = model.embed(tokens).astype(model.dtype)
  positions = jnp.arange(tokens.shape[1])[None]
  out = []
  for block in model.blocks:
    *_, qr, kr = learned_layers.projections(
        block.attn, block.attn_norm(x), positions)
    out.append((qr, kr))
    x = block(x, positions)
  return out


def search_minference(dense: _Model, preset: Preset) -> dict:
  """Per-layer, per-head MInference patterns on calibration needles."""
  length = preset.eval_length
  batch = data.make_needle_batch(preset.seed + 77, preset.calib_examples,
                                 length, None, value_len=VALUE_LEN)
  graphdef, consts = dense.graphdefs[length], dense.consts[length]

  @jax.jit
  def qk(params, tokens):
    return layer_qk(nnx.merge(graphdef, params, consts), tokens)

  per_layer = qk(dense.state["params"], batch["inputs"])
  candidates = [minference.parse_pattern(c)
                for c in preset.minference_candidates]
  results = []
  for q, k in per_layer:
    r = minference.search_patterns(
        q, k, candidates, block_size=preset.seer["block_size"],
        min_recall=preset.minference_recall, skip_rows=length // 8)
    results.append(dict(patterns=r["patterns"], recall=r["recall"].tolist(),
                        density=r["density"].tolist()))
  return dict(candidates=list(preset.minference_candidates),
              layers=results,
              head_patterns=learned_layers.minference_patterns_json(results))


def run(get_config: Callable[[str], Any], preset: Preset, out_dir: str, *,
        start_time: Optional[float] = None) -> dict:
  """Trains, distills, searches and evaluates; writes JSON, tables, plots."""
  start = time.time() if start_time is None else start_time
  deadline = start + preset.max_seconds - preset.reserve_s
  warnings.filterwarnings("ignore", "Some donated buffers were not usable")
  length = preset.eval_length
  common = {**preset.model, "seq_len": length,
            "num_train_steps": preset.steps, "attention.impl": "auto",
            "progress_bar": False}
  t = time.perf_counter()
  specs = variants(preset)
  models = [_Model(v.name, compare.make_config(get_config, v, common),
                   preset.train_lengths) for v in specs]
  dense = models[0]
  seer_options = dict(preset.seer, mode="distill", density=0.5)
  seer_cfg = compare.make_config(get_config, compare.Variant(
      "seer", "attention=seer,task=needle", {
          "attention.options": seer_options,
          "optimizer.learning_rate": preset.distill_lr,
          "optimizer.warmup_steps": 10,
          "optimizer.decay_steps": preset.distill_steps,
          "trainable": SEER_TRAINABLE}), common)
  seer = _Model("seer_distill", seer_cfg, (length,), trainable=SEER_TRAINABLE)
  sparse_cfgs = {
      f"seer@{d:g}": compare.apply_overrides(seer_cfg, {"attention.options": {
          **seer_options, "mode": "sparse", "density": d}})
      for d in preset.seer_densities}
  fixed_cfg = compare.make_config(get_config, compare.Variant(
      "minference_fixed", "attention=minference,task=needle", {
          "attention.options": dict(
              pattern=preset.minference_fixed, head_patterns="",
              block_size=preset.seer["block_size"])}), common)
  info = data.task_info(dense.config.data)
  # Variants evaluated on another model's params: name -> (graphdef,
  # params template, consts, source of the params).
  borrowed = {}
  for name, cfg in [*sparse_cfgs.items(), ("minference_fixed", fixed_cfg)]:
    borrowed[name] = _borrow(cfg, info, "seer" if name.startswith("seer")
                             else "dense")
  build_s = time.perf_counter() - t

  compiler = aot.Compiler()
  npreset = _needle_preset(preset)
  for n in preset.train_lengths:
    batch = _spec(needle_long.train_batch(npreset, 0, n))
    for m in models:
      compiler.submit((m.name, n), m.step_fn(n), _spec(m.state),
                      m.consts[n], batch)
  distill_batch = _spec(needle_long.train_batch(npreset, 0, length))
  compiler.submit(("seer_distill", length), seer.step_fn(length),
                  _spec(seer.state), seer.consts[length], distill_batch)
  ev = eval_batches(preset)
  tok = jax.ShapeDtypeStruct(ev[0][1].shape, jnp.int32)
  stats = jax.jit(answer_stats, static_argnums=0)
  for m in models:
    compiler.submit(("eval", m.name), stats, m.graphdefs[length],
                    _spec(m.state["params"]),
                    (m.consts[length], m.state["model_state"]), tok, tok)
  for name, (graphdef, params, consts, _) in borrowed.items():
    compiler.submit(("eval", name), stats, graphdef, _spec(params), consts,
                    tok, tok)
  print(f"built {len(models) + 1 + len(borrowed)} models in "
        f"{build_s:.0f} s; training until step {preset.steps} or "
        f"{max(deadline - time.time(), 0):.0f} s from now", flush=True)

  trained = _train(models, npreset, compiler, deadline, preset)
  out = dict(preset=dataclasses.asdict(preset), eval_length=length,
             steps_done=trained["steps_done"],
             stopped_reason=trained["stopped_reason"],
             seconds=dict(build=build_s, train=trained["train_s"]),
             device=jax.devices()[0].device_kind,
             backend=jax.default_backend(), jax_version=jax.__version__,
             models={})
  for m in models:
    out["models"][m.name] = dict(train_loss=trained["losses"][m.name],
                                 num_params=m.num_params,
                                 trained=True)
  path = os.path.join(out_dir, JSON_NAME)
  compare.save_json(out, path)

  # Seer: the gates on the trained dense model, base frozen.
  t = time.perf_counter()
  seer = _Model("seer_distill", seer_cfg, (length,),
                trainable=SEER_TRAINABLE, params=dense.state["params"])
  distill_losses = []
  step = compiler.get(("seer_distill", length))
  for i in range(preset.distill_steps):
    batch = needle_long.train_batch(npreset, 10**6 + i, length)
    seer.state, metrics = step(seer.state, seer.consts[length], batch)
    if (i + 1) % max(preset.distill_steps // 20, 1) == 0:
      distill_losses.append([i + 1, float(metrics["aux_loss"])])
  out["seer_distill"] = dict(kl_loss=distill_losses,
                             seconds=time.perf_counter() - t)
  print(f"seer distillation: KL (x{preset.seer['gate_loss_scale']:g}, summed "
        f"over layers) {distill_losses[0][1]:.4f} -> "
        f"{distill_losses[-1][1]:.4f} in {preset.distill_steps} steps",
        flush=True)

  # MInference: per-head search on calibration needles.
  t = time.perf_counter()
  try:
    out["minference_search"] = search_minference(dense, preset)
    searched_cfg = compare.make_config(get_config, compare.Variant(
        "minference_searched", "attention=minference,task=needle", {
            "attention.options": dict(
                pattern=preset.minference_fixed,
                head_patterns=out["minference_search"]["head_patterns"],
                block_size=preset.seer["block_size"])}), common)
    borrowed["minference_searched"] = entry = _borrow(searched_cfg, info,
                                                      "dense")
    compiler.submit(("eval", "minference_searched"), stats, entry[0],
                    _spec(entry[1]), entry[2], tok, tok)
  except Exception as e:  # pylint: disable=broad-except
    out["minference_search"] = dict(error=f"{type(e).__name__}: {e}")
  out["minference_search_seconds"] = time.perf_counter() - t

  _evaluate(models, seer, borrowed, ev, compiler, out, length)
  compiler.close()
  out["seconds"]["total"] = time.time() - start
  compare.save_json(out, path)
  print(tables(out))
  with open(os.path.join(out_dir, "learned_evidence.md"), "w") as f:
    f.write(tables(out) + "\n")
  plot(out, out_dir)
  print(f"done in {out['seconds']['total']:.0f} s; results in {path}",
        flush=True)
  return out


def _train(models, npreset, compiler, deadline, preset):
  """Lockstep training (needle_long's schedule) until steps or deadline."""
  schedule = needle_long.length_schedule(npreset)
  losses = {m.name: [] for m in models}
  pending, done, stopped = [], 0, None
  clock = aot.WorkClock(compiler)  # compile waits do not count
  budget = deadline - time.time()
  try:
    for step, n in enumerate(schedule):
      if clock.seconds() > budget:
        stopped = "time budget"
        break
      batch = needle_long.train_batch(npreset, step, int(n))
      for m in models:
        m.state, metrics = compiler.get((m.name, int(n)))(
            m.state, m.consts[int(n)], batch)
        pending.append((m.name, step + 1, int(n), metrics["loss"]))
      done = step + 1
      if done % preset.log_every == 0:
        for name, s, length, loss in pending:
          losses[name].append([s, length, float(loss)])
        pending.clear()
        if done % (preset.log_every * 8) == 0:
          print(f"step {done} ({clock.wall:.0f} s): " +
                ", ".join(f"{k} {v[-1][2]:.3f}@{v[-1][1]}"
                          for k, v in losses.items()), flush=True)
    for name, s, length, loss in pending:
      losses[name].append([s, length, float(loss)])
    jax.block_until_ready([m.state for m in models])
  except Exception as e:  # pylint: disable=broad-except
    stopped = f"{type(e).__name__}: {str(e)[:300]}"
    print(f"training stopped at step {done}: {stopped}", flush=True)
  return dict(steps_done=done, stopped_reason=stopped, losses=losses,
              train_s=clock.wall, compile_wait_s=clock.waited)


def _borrow(config, info, source: str):
  """(graphdef, params template, consts, source) of a variant that runs on
  the params of model `source` ("dense" or "seer")."""
  model = nn.build_model(config, info, seed=config.seed)
  graphdef, params, model_state, consts = nnx.split(model, nnx.Param,
                                                    StepState, ...)
  return graphdef, params, (consts, model_state), source


def _with_params(template, params):
  """`template` with every leaf that `params` has (by path)."""
  flat, have = checkpoints.flatten(template), checkpoints.flatten(params)
  flat.update({k: v for k, v in have.items() if k in flat})
  return checkpoints.unflatten(template, flat)


def _evaluate(models, seer, borrowed, ev, compiler, out, length):
  """Needle exact match (per depth) and answer loss of every variant."""
  runs = {m.name: (m.state["params"], (m.consts[length],
                                       m.state["model_state"]))
          for m in models}
  sources = {"dense": models[0], "seer": seer}
  for name, (_, template, consts, source) in borrowed.items():
    runs[name] = (_with_params(template, sources[source].state["params"]),
                  consts)
  for name, (params, consts) in runs.items():
    t = time.perf_counter()
    try:
      fn = compiler.get(("eval", name))
      per_depth, losses, dens = {}, [], []
      for depth, inputs, targets in ev:
        ce, match, density = fn(params, consts, jnp.asarray(inputs),
                                jnp.asarray(targets))
        per_depth.setdefault(str(depth), []).extend(np.asarray(match))
        losses.extend(np.asarray(ce).tolist())
        dens.append(float(density))
      result = dict(accuracy={d: float(np.mean(v)) for d, v in
                              per_depth.items()},
                    answer_loss=float(np.mean(losses)),
                    density=float(np.mean(dens)),
                    eval_seconds=time.perf_counter() - t)
      result["mean_accuracy"] = float(np.mean(list(
          result["accuracy"].values())))
    except Exception as e:  # pylint: disable=broad-except
      result = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    out["models"].setdefault(name, {}).update(result)
    print(f"{name:22s} " + (f"exact match {result['mean_accuracy']:.3f}, "
                            f"answer loss {result['answer_loss']:.3f}, "
                            f"kept density {result['density']:.3f}"
                            if "error" not in result else result["error"]),
          flush=True)


def tables(out: Mapping[str, Any]) -> str:
  """Markdown tables: every variant's needle accuracy and answer loss."""
  depths = out["preset"]["depths"]
  lines = [f"Needle retrieval at {out['eval_length']} tokens "
           f"({out['steps_done']} lockstep training steps; "
           f"{out['device']})", "",
           "| variant | kept density | answer loss | exact match | " +
           " | ".join(f"depth {d:g}" for d in depths) + " |",
           "|---" * (4 + len(depths)) + "|"]
  for name, m in out["models"].items():
    if "error" in m:
      lines.append(f"| {name} | failed: {m['error'][:80]} |")
      continue
    if "accuracy" not in m:
      continue
    lines.append(f"| {name} | {m['density']:.3f} | {m['answer_loss']:.3f} | "
                 f"{m['mean_accuracy']:.3f} | " + " | ".join(
                     f"{m['accuracy'].get(str(float(d)), float('nan')):.2f}"
                     for d in depths) + " |")
  return "\n".join(lines)


def plot(out: Mapping[str, Any], out_dir: str) -> list[str]:
  """Seer accuracy/loss vs sparsity, and the three training curves."""
  try:
    from sparsejax import plotting  # pylint: disable=g-import-not-at-top
  except ImportError:
    return []
  plt = plotting.plt
  models = out["models"]
  paths = []
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  seer = sorted((1 - m["density"], m) for n, m in models.items()
                if n.startswith("seer@") and "density" in m)
  if seer:
    xs = [100 * s for s, _ in seer]
    ax.plot(xs, [m["mean_accuracy"] for _, m in seer], "o-", label="seer")
    ax2.plot(xs, [m["answer_loss"] for _, m in seer], "o-", label="seer")
  for name, style in (("dense", "k--"), ("minference_searched", "g:"),
                      ("minference_fixed", "m:")):
    m = models.get(name, {})
    if "mean_accuracy" in m:
      label = f"{name} (density {m['density']:.2f})"
      ax.axhline(m["mean_accuracy"], color=style[0], ls=style[1:],
                 label=label)
      ax2.axhline(m["answer_loss"], color=style[0], ls=style[1:],
                  label=label)
  ax.set_xlabel("block sparsity (% of causal blocks skipped)")
  ax.set_ylabel("needle exact match")
  ax2.set_xlabel("block sparsity (% of causal blocks skipped)")
  ax2.set_ylabel("answer loss (nats)")
  ax.set_title(f"SeerAttention at {out['eval_length']} tokens")
  for a in (ax, ax2):
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "seer_sparsity.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 4))
  for i, name in enumerate(("dense", "local", "routing_transformer")):
    curve = models.get(name, {}).get("train_loss") or []
    if curve:
      steps, _, loss = zip(*curve)
      k = max(len(loss) // 30, 1)
      smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
      ax.plot(steps[k - 1:], smooth, color=f"C{i}", label=name)
  ax.set_xlabel("step")
  ax.set_ylabel("answer loss (nats, running mean)")
  ax.set_title("Routing Transformer vs local-only vs dense (same steps)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "routing_loss.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  return paths


__all__ = ["PRESETS", "Preset", "run", "tables", "plot", "answer_stats",
           "layer_qk", "search_minference", "variants"]

