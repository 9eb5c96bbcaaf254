"""Needle retrieval at 2K-32K tokens: dense vs S2-hybrid, trained long.

  out = needle_long.run(lm.get_config, needle_long.PRESETS["gpu"], out_dir)

The two models train in lockstep: the same init seed, the same needle
batches and the same steps; only attention differs. Batches come from
`data.make_needle_batch` at random depths, generated on the fly. Each step
holds `tokens_per_step` tokens at one length from `length_schedule`: the
shortest length alone first (one answer per sequence, so short sequences
give the most answers per token; retrieval is learnt there), then longer
lengths unlock one by one and each step draws among the unlocked ones. A few
fixed (length, batch) shapes keep the compiles few; they compile in
background threads while training starts on the shortest.

Evaluation is exact match of the answer (`needle.needle_accuracy`) per
length and depth. Every length goes through one compiled forward at the
longest length (end padding is exact under causal attention). `max_minutes`
ends training early so that evaluation and the results still fit the budget.
"""

import collections
import dataclasses
import functools
import os
import time
from typing import Any, Callable, Mapping, Optional
import warnings

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import sparsejax as sj
from sparsejax import data
from sparsejax import nn
from sparsejax.evals import compare
from sparsejax.evals import needle
from sparsejax.evals import report
from sparsejax.training import aot
from sparsejax.training import metrics as metrics_lib
from sparsejax.training import optimizer as optimizer_lib
from sparsejax.training import tasks
from sparsejax.training import train

JSON_NAME = "needle_long.json"
VALUE_LEN = 2  # answer tokens (data.needle default)
# Training needles use seeds from here on; eval seeds stay far below.
_TRAIN_SEED_BASE = 10**9


@dataclasses.dataclass(frozen=True)
class Preset:
  """Model, schedule and time budget of one run."""
  model: Mapping[str, Any]  # configs/lm.py overrides, dotted paths
  s2_options: Mapping[str, Any]
  dense_block: int
  train_lengths: tuple[int, ...]  # ascending
  tokens_per_step: int  # batch at length L = tokens_per_step // L
  steps: int
  unlock_frac: float  # longer lengths unlock over this fraction of steps
  eval_lengths: tuple[int, ...]
  eval_examples: int  # needles per (length, depth)
  eval_batch: int  # rows per eval forward (at the longest length)
  max_minutes: float  # whole run, start-up included
  eval_reserve_s: float  # kept back from training for eval and plots
  depths: tuple[float, ...] = needle.DEFAULT_DEPTHS
  log_every: int = 25
  seed: int = 0


PRESETS = {
    # One H200, bf16: 4 layers, d_model 256, 4 heads of 64 (GPU-checked
    # head_dim). RoPE theta 5e5 leaves a few rotary pairs nearly still over
    # 32K tokens, so a head can match content at any distance.
    "gpu": Preset(
        model={"dtype": "bfloat16", "model.num_layers": 4,
               "model.d_model": 256, "model.mlp_dim": 1024,
               "model.num_heads": 4, "model.num_kv_heads": 4,
               "model.rope_theta": 5e5, "optimizer.learning_rate": 2e-3},
        # 128-token blocks (two 64-row warpgroups per tile in the Mosaic GPU
        # kernel that impl "auto" picks on the H200), a 512-token band and
        # every 4th block; each of the 4 kv heads owns one residue class, so
        # the union covers the context (26% of causal pairs per head at 32K).
        s2_options=dict(block_size=128, local_blocks=4, vert_stride=4,
                        num_dense_heads=0, homo_head=False,
                        head_sliding_offset=0),
        # 64 tokens alone for the first 375 steps (512 needles a step): on 2
        # CPU cores a d_model-128 copy left the chance plateau after ~40K
        # needles at 64 tokens. Each longer length then unlocks every 375
        # steps; 32K runs on ~300 steps.
        dense_block=128, train_lengths=(64, 512, 2048, 8192, 32768),
        tokens_per_step=32768, steps=3000, unlock_frac=0.5,
        eval_lengths=(2048, 4096, 8192, 16384, 32768), eval_examples=32,
        eval_batch=2, max_minutes=6.5, eval_reserve_s=60),
    # Two CPU cores, float32 (impl "auto" is "xla" there): the code path only.
    "smoke": Preset(
        model={"dtype": "float32", "model.num_layers": 2, "model.d_model": 32,
               "model.mlp_dim": 64, "model.num_heads": 2,
               "model.num_kv_heads": 2, "optimizer.learning_rate": 3e-3},
        s2_options=dict(block_size=16, local_blocks=2, vert_stride=2,
                        num_dense_heads=0, homo_head=False,
                        head_sliding_offset=0),
        dense_block=16, train_lengths=(64, 128, 256), tokens_per_step=1024,
        steps=40, unlock_frac=0.5, eval_lengths=(128, 256), eval_examples=4,
        eval_batch=2, max_minutes=2.0, eval_reserve_s=20, log_every=10),
}


def variants(preset: Preset) -> list[compare.Variant]:
  """dense and s2_hybrid (layer l dense iff (l + 1) % 2 == 0)."""
  return [
      compare.Variant("dense", "attention=dense,task=needle",
                      {"attention.options": dict(
                          block_size=preset.dense_block)}),
      compare.Variant("s2_hybrid", "attention=s2,task=needle",
                      {"attention.options": dict(preset.s2_options),
                       "attention.dense_every_n": 2}),
  ]


def length_schedule(preset: Preset) -> np.ndarray:
  """The sequence length of every step (deterministic in preset.seed).

  Length k of n (ascending) unlocks at step k / (n - 1) * unlock_frac *
  steps; each step draws uniformly among the unlocked lengths.
  """
  n, steps = len(preset.train_lengths), preset.steps
  unlock = [int(k / max(n - 1, 1) * preset.unlock_frac * steps)
            for k in range(n)]
  rng = np.random.default_rng([preset.seed, 1])
  allowed = np.searchsorted(unlock, np.arange(steps), side="right")
  picks = (rng.random(steps) * allowed).astype(int)
  return np.asarray(preset.train_lengths)[picks]


def train_batch(preset: Preset, step: int, seq_len: int) -> dict:
  """The training batch of `step`: random-depth needles at seq_len."""
  batch = data.make_needle_batch(
      _TRAIN_SEED_BASE + preset.seed * 10**6 + step,
      max(preset.tokens_per_step // seq_len, 1), seq_len, None,
      value_len=VALUE_LEN)
  return {k: batch[k] for k in ("inputs", "targets", "loss_mask")}


class _Model:
  """One variant: its state and, per length, graphdef and masks (consts)."""

  def __init__(self, name: str, config, lengths):
    self.name, self.config = name, config
    info = data.task_info(config.data)
    self.graphdefs, self.consts = {}, {}
    for length in lengths:
      model = nn.build_model(needle.with_seq_len(config, length), info,
                             seed=config.seed)
      self.graphdefs[length], params, self.consts[length] = nnx.split(
          model, nnx.Param, ...)
    # Params do not depend on the length (RoPE): any build's will do.
    self.num_params = int(sum(p.size for p in jax.tree.leaves(params)))
    self.tx = optimizer_lib.make_optimizer(config.optimizer)
    self.state = train.init_state(self.tx, params)


def _spec(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _submit_compiles(models, preset, compiler, max_len):
  """Train steps in curriculum order, then the eval forwards."""
  task = tasks.get_task("lm")
  for length in preset.train_lengths:
    batch = _spec(train_batch(preset, 0, length))
    for m in models:
      step = jax.jit(functools.partial(train.train_step, m.graphdefs[length],
                                       m.tx, task), donate_argnums=(0,))
      compiler.submit((m.name, length), step, _spec(m.state),
                      m.consts[length], batch)
  rows = jax.ShapeDtypeStruct((preset.eval_batch,), jnp.int32)
  inputs = jax.ShapeDtypeStruct((preset.eval_batch, max_len), jnp.int32)
  for m in models:
    predict = jax.jit(functools.partial(
        needle.predict_answers, m.graphdefs[max_len], value_len=VALUE_LEN))
    compiler.submit((m.name, "eval"), predict, _spec(m.state["params"]),
                    m.consts[max_len], inputs, rows)


def _train(models, preset, compiler, deadline: float) -> dict:
  """Lockstep training until the schedule ends or `deadline` (time.time).

  A failure (a compile error, a non-finite loss) stops both models, so they
  stay in lockstep; it is logged and returned, and evaluation still runs.
  """
  schedule = length_schedule(preset)
  losses = {m.name: [] for m in models}  # [step, length, loss]
  step_s = {m.name: {} for m in models}  # timed steps, by length
  pending, seen, done, stopped = [], set(), 0, None
  report_every = max(len(schedule) // 10, preset.log_every)
  next_report = report_every
  bar = tqdm.tqdm(total=len(schedule), desc="train (both models)",
                  mininterval=2, dynamic_ncols=True)
  start = time.perf_counter()
  try:
    for step, length in enumerate(schedule):
      if time.time() > deadline:
        stopped = "time budget (max_minutes)"
        break
      length = int(length)
      batch = train_batch(preset, step, length)
      # Every log_every steps each model's step runs alone and synchronously:
      # its wall time per length (a length's first step waits to compile).
      timed = (step + 1) % preset.log_every == 0 and length in seen
      if timed:
        jax.block_until_ready([m.state for m in models])
      for m in models:
        t = time.perf_counter()
        m.state, out = compiler.get((m.name, length))(
            m.state, m.consts[length], batch)
        if timed:
          jax.block_until_ready(out["loss"])
          step_s[m.name].setdefault(str(length), []).append(
              time.perf_counter() - t)
        pending.append((m.name, step + 1, length, out["loss"]))
      seen.add(length)
      done = step + 1
      bar.update(1)
      if done % preset.log_every == 0 or done == len(schedule):
        _flush(pending, losses, bar)
        if done >= next_report:
          next_report += report_every
          tqdm.tqdm.write(f"step {done}/{len(schedule)} at "
                          f"{time.perf_counter() - start:.0f} s: " +
                          ", ".join(f"{k} loss {v[-1][2]:.3f} (L={v[-1][1]})"
                                    for k, v in losses.items()))
    _flush(pending, losses, bar)
    jax.block_until_ready([m.state for m in models])
  except Exception as e:  # pylint: disable=broad-except
    # Keep what was trained: evaluate it and say why training stopped.
    logging.exception("training stopped after step %d", done)
    stopped = f"{type(e).__name__}: {e}"
  bar.close()
  return dict(steps_done=done, stopped_early=done < len(schedule),
              stopped_reason=stopped, train_s=time.perf_counter() - start,
              losses=losses,
              step_s={name: {k: float(np.median(v)) for k, v in d.items()}
                      for name, d in step_s.items()})


def _flush(pending, losses, bar):
  """Fetches the queued losses (the loop's only regular host sync)."""
  if not pending:
    return
  items = list(pending)
  pending.clear()
  values = jax.device_get([p[3] for p in items])
  for (name, step, length, _), value in zip(items, values):
    metrics_lib.check_finite(step, {f"{name}/loss": value})
    losses[name].append([step, length, float(value)])
  bar.set_postfix({name: f"{v[-1][2]:.3f}@{v[-1][1]}"
                   for name, v in losses.items() if v})


def _predict_fn(compiled, model, max_len, batch):
  params = model.state["params"]
  consts = model.consts[max_len]

  def predict(inputs):
    padded, ends = needle.pad_inputs(np.asarray(inputs), max_len, batch)
    return np.asarray(compiled(params, consts, padded, ends))[:len(inputs)]

  return predict


def _evaluate(models, preset, compiler, out, max_len, path):
  """Exact match per (length, depth); the JSON is rewritten per length."""
  for length in tqdm.tqdm(preset.eval_lengths, desc="eval lengths"):
    for m in models:
      predict = _predict_fn(compiler.get((m.name, "eval")), m, max_len,
                            preset.eval_batch)
      acc = needle.needle_accuracy(
          {length: predict}, depths=preset.depths,
          num_examples=preset.eval_examples, batch_size=preset.eval_batch,
          seed=preset.seed, value_len=VALUE_LEN)
      result = out["models"][m.name]
      for key in ("accuracy", "token_accuracy"):
        result[key][str(length)] = acc[key][str(length)]
      result["eval_seconds"][str(length)] = acc["seconds"][str(length)]
      mean = report.mean_over_depths(acc["accuracy"][str(length)])
      tqdm.tqdm.write(f"{m.name} L={length}: exact match {mean:.3f}")
    compare.save_json(out, path)


def run(get_config: Callable[[str], Any], preset: Preset, out_dir: str, *,
        start_time: Optional[float] = None,
        specs: Optional[list[compare.Variant]] = None) -> dict:
  """Trains both models, evaluates them, writes JSON and plots to out_dir.

  Args:
    get_config: `configs.lm.get_config` (the library does not import
      configs/).
    preset: sizes, schedule and budget (see PRESETS).
    out_dir: where needle_long.json and the PNGs go.
    start_time: time.time() at process start (the budget counts start-up).
    specs: the variants to train in lockstep (default `variants(preset)`:
      dense and s2_hybrid).

  Returns:
    The JSON dict: models -> {accuracy: {length: {depth: exact match}},
    token_accuracy, eval_seconds, train_loss [[step, length, loss]],
    step_seconds {length: median}, ...}, plus lengths, depths, config and
    wall times.
  """
  start = time.time() if start_time is None else start_time
  deadline = start + 60 * preset.max_minutes - preset.eval_reserve_s
  # CPU cannot donate buffers; the warning says nothing about the run.
  warnings.filterwarnings("ignore", "Some donated buffers were not usable")
  max_len = max(max(preset.train_lengths), max(preset.eval_lengths))
  common = {**preset.model, "seq_len": max_len,
            "num_train_steps": preset.steps, "attention.impl": "auto",
            "progress_bar": False}
  specs = list(specs) if specs else variants(preset)
  lengths = sorted(set(preset.train_lengths) | {max_len})
  t = time.perf_counter()
  models = [_Model(v.name, compare.make_config(get_config, v, common),
                   lengths) for v in specs]
  build_s = time.perf_counter() - t
  # (Variants with other parameters, e.g. lightning layers, differ anyway.)
  same_init = all(
      jax.tree.structure(m.state["params"]) == jax.tree.structure(
          models[0].state["params"]) and
      all(jax.tree.leaves(jax.tree.map(
          lambda a, b: bool(jnp.array_equal(a, b)),
          models[0].state["params"], m.state["params"])))
      for m in models[1:])
  coverage = sj.masks.s2_coverage(sj.masks.s2(
      max_len, models[0].config.model.num_heads,
      num_kv_heads=models[0].config.model.num_kv_heads, **preset.s2_options))

  # From here the main thread runs executables only; tracing is the
  # compiler's (background) business.
  compiler = aot.Compiler()
  _submit_compiles(models, preset, compiler, max_len)
  print(f"built {len(models)} models x {len(lengths)} lengths in "
        f"{build_s:.0f} s; compiling in the background; training until step "
        f"{preset.steps} or {max(deadline - time.time(), 0):.0f} s from now",
        flush=True)
  trained = _train(models, preset, compiler, deadline)
  out = dict(
      lengths=list(preset.eval_lengths), depths=list(preset.depths),
      examples={str(n): preset.eval_examples for n in preset.eval_lengths},
      preset=dataclasses.asdict(preset), same_init=same_init,
      steps_done=trained["steps_done"],
      stopped_early=trained["stopped_early"],
      stopped_reason=trained["stopped_reason"],
      steps_per_length={str(k): v for k, v in sorted(collections.Counter(
          length_schedule(preset)[:trained["steps_done"]].tolist()).items())},
      s2_coverage_at_max_len=dict(
          covers_all=coverage["covers_all"],
          density_per_head=coverage["density_per_head"]),
      seconds=dict(build=build_s, train=trained["train_s"]),
      device=jax.devices()[0].device_kind, backend=jax.default_backend(),
      jax_version=jax.__version__, models={})
  for v, m in zip(specs, models):
    out["models"][m.name] = dict(
        accuracy={}, token_accuracy={}, eval_seconds={},
        train_loss=trained["losses"][m.name],
        step_seconds=trained["step_s"][m.name], num_params=m.num_params,
        arg=v.arg, overrides={**common, **v.overrides},
        trained_at=f"{min(preset.train_lengths)}-"
                   f"{max(preset.train_lengths)} mix")
  path = os.path.join(out_dir, JSON_NAME)
  _evaluate(models, preset, compiler, out, max_len, path)
  compiler.close()
  out["seconds"]["compile"] = {"/".join(map(str, k)): v
                               for k, v in compiler.seconds.items()}
  out["seconds"]["total"] = time.time() - start
  compare.save_json(out, path)
  print(report.needle_table(out))
  plot(out_dir)
  print(f"done in {out['seconds']['total']:.0f} s "
        f"({out['steps_done']} steps); results in {path}", flush=True)
  return out


def plot(out_dir: str) -> list[str]:
  """Redraws the plots from out_dir/needle_long.json; returns the paths."""
  try:
    from sparsejax.evals import plots  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # matplotlib missing: the JSON is the result
    print(f"no plots ({e}); redraw later with --plot_only")
    return []
  result = compare.load_json(os.path.join(out_dir, JSON_NAME))
  return [
      plots.needle_vs_length(result, os.path.join(
          out_dir, "needle_long_accuracy.png")),
      plots.needle_heatmaps(result, os.path.join(
          out_dir, "needle_long_heatmaps.png")),
  ]
