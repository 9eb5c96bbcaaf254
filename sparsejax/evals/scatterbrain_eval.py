"""Scatterbrain evidence at small scale (the paper's claims, issue #13).

  out = scatterbrain_eval.run(lm.get_config, vit.get_config, PRESETS["cpu"],
                              workdir, out_dir)

1. Approximation error of the attention output against exact softmax
   attention at an equal budget of b keys per query with the paper's
   accounting (`method_settings`): local attention alone (b keys),
   Performer alone (b/2 features) and Scatterbrain (b/2 keys plus b/4
   features), and Scatterbrain's two parts alone; each Performer draw
   repeated over `seeds` projections. On random Gaussian q/k/v (three
   temperatures) and on the q/k/v of a layer of a trained LM and ViT.
2. Drop-in without fine-tuning: the dense-trained LM and ViT evaluated with
   local, Performer and Scatterbrain attention (the dense checkpoint loads
   into the low-rank layers unchanged).
3. Training from scratch with attention=scatterbrain (and local, Performer)
   through the registry, against dense, on the same data and steps.

The paper's budget is memory (its "1/32 of the memory" configs); here it
counts keys per query, one feature counting as two keys as in those
configs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import sparsejax as sj
from sparsejax import data
from sparsejax import lowrank
from sparsejax.evals import compare
from sparsejax.nn import lowrank_layers
from sparsejax.training import sharding
from sparsejax.training import train

JSON_NAME = "scatterbrain_eval.json"
METHODS = ("local", "performer", "scatterbrain")
# Scatterbrain's two parts alone, at their own sizes: the robust-PCA claim
# that the combination beats each of its parts.
PARTS = ("local_part", "performer_part")


@dataclasses.dataclass(frozen=True)
class Preset:
  """Sizes, budgets and training settings of one run."""
  random_len: int
  random_heads: int
  random_head_dim: int
  temperatures: tuple[float, ...]  # std of q and k entries
  budgets: tuple[int, ...]
  seeds: int  # projections per Performer / Scatterbrain error
  lm: Mapping[str, Any]  # configs/lm.py overrides (dotted paths)
  vit: Mapping[str, Any]  # configs/vit.py overrides
  vit_arg: str  # configs/vit.py arg (the task)
  lm_budget: int  # budget of the drop-in and from-scratch variants
  vit_budget: int
  capture_layer: int
  capture_batch: int


_COMMON = {"attention.impl": "xla", "progress_bar": False, "log_every": 25}
PRESETS = {
    "cpu": Preset(
        random_len=1024, random_heads=4, random_head_dim=64,
        temperatures=(0.5, 1.0, 1.5), budgets=(32, 64, 128), seeds=3,
        lm={**_COMMON, "seq_len": 256, "batch_size": 8,
            "num_train_steps": 200, "eval_steps": 8},
        vit={**_COMMON, "batch_size": 32, "num_train_steps": 200,
             "eval_steps": 8, "data.upsample": 4, "model.patch_size": 2,
             "model.d_model": 64, "model.num_layers": 2},
        vit_arg="task=digits", lm_budget=64, vit_budget=64, capture_layer=1,
        capture_batch=4),
    "smoke": Preset(
        random_len=128, random_heads=2, random_head_dim=32,
        temperatures=(1.0,), budgets=(16, 32), seeds=1,
        lm={**_COMMON, "seq_len": 64, "batch_size": 4, "num_train_steps": 6,
            "eval_steps": 1, "model.d_model": 32, "log_every": 2},
        vit={**_COMMON, "batch_size": 8, "num_train_steps": 6,
             "eval_steps": 1, "data.upsample": 2, "model.patch_size": 2,
             "model.d_model": 32, "model.num_layers": 1, "log_every": 2},
        vit_arg="task=digits", lm_budget=16, vit_budget=16, capture_layer=0,
        capture_batch=1),
}


# --- methods at one budget ----------------------------------------------------


def method_settings(budget: int, causal: bool) -> dict[str, dict]:
  """Window (in sliding_window's units) and feature count per method at a
  budget of `budget` keys per query, with the paper's accounting (its
  "1/32 of the memory" T2T-ViT configs: local_context 98 = Performer
  nb_features 49 = Scatterbrain local_context 49 + nb_features 24, i.e. one
  feature costs two keys): local b keys, Performer b/2 features,
  Scatterbrain b/2 keys and b/4 features. A causal window of w has w keys,
  a bidirectional one 2w - 1."""
  window = lambda keys: max(1, keys if causal else (keys + 1) // 2)
  feats = lambda n: max(2, n - n % 2)  # cosh features come in pairs
  sb = dict(window=window(budget // 2), num_features=feats(budget // 4))
  return {"local": dict(window=window(budget)),
          "performer": dict(num_features=feats(budget // 2)),
          "scatterbrain": sb,
          "local_part": dict(window=sb["window"]),
          "performer_part": dict(num_features=sb["num_features"])}


def _block(length):
  return int(min(64, max(16, 1 << (length - 1).bit_length())))


@functools.lru_cache(maxsize=None)
def _methods(length: int, causal: bool, budget: int):
  """{method: jitted fn(q, k, v, projection_key)} at `budget`."""
  settings = method_settings(budget, causal)
  block = _block(length)
  window = lambda w: sj.masks.sliding_window(length, w, causal=causal,
                                             block_size=block)
  support = window(settings["scatterbrain"]["window"])

  def projection(key, method, d):
    return lowrank.orthogonal_gaussian_projection(
        key, settings[method]["num_features"], d)

  def local(method):
    mask = window(settings[method]["window"])
    return jax.jit(lambda q, k, v, key: sj.attention(q, k, v, mask,
                                                     impl="xla"))

  def performer(method):
    return jax.jit(lambda q, k, v, key: lowrank.performer_attention(
        q, k, v, projection(key, method, q.shape[-1]), causal=causal))

  return {
      "local": local("local"), "performer": performer("performer"),
      "scatterbrain": jax.jit(
          lambda q, k, v, key: lowrank.scatterbrain_attention(
              q, k, v, support, projection(key, "scatterbrain", q.shape[-1]),
              causal=causal, impl="xla")),
      "local_part": local("local_part"),
      "performer_part": performer("performer_part"),
  }


def outputs(q, k, v, *, causal: bool, budget: int, seed: int) -> dict:
  """{method: output} at `budget` (Performer parts with projection `seed`)."""
  fns = _methods(q.shape[1], causal, budget)
  key = jax.random.key(seed)
  return {m: f(q, k, v, key) for m, f in fns.items()}


def exact(q, k, v, *, causal: bool):
  mask = sj.masks.causal(q.shape[1], block_size=_block(q.shape[1])) if (
      causal) else None
  return jax.jit(lambda q, k, v: sj.attention_reference(
      q, k, v, mask, scale=q.shape[-1] ** -0.5)[0])(q, k, v)


def relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def approximation_errors(q, k, v, *, causal: bool, budgets, seeds: int,
                         source: str) -> list[dict]:
  """Rows {source, budget, method, error (mean over seeds), error_std}."""
  want = exact(q, k, v, causal=causal)
  rows = []
  for budget in budgets:
    errs = {m: [] for m in METHODS + PARTS}
    for seed in range(seeds):
      for m, o in outputs(q, k, v, causal=causal, budget=budget,
                          seed=seed).items():
        errs[m].append(relative_error(o, want))
    for m in METHODS + PARTS:
      rows.append(dict(source=source, budget=budget, method=m,
                       error=float(np.mean(errs[m])),
                       error_std=float(np.std(errs[m])),
                       **method_settings(budget, causal)[m]))
  return rows


def random_qkv(preset: Preset, temperature: float, seed: int = 0):
  ks = jax.random.split(jax.random.key(seed), 3)
  shape = (1, preset.random_len, preset.random_heads, preset.random_head_dim)
  return (temperature * jax.random.normal(ks[0], shape),
          temperature * jax.random.normal(ks[1], shape),
          jax.random.normal(ks[2], shape))


# --- q/k/v of a trained model -----------------------------------------------


class _Capture:
  """Wraps an attention layer; records the q, k, v it computes."""

  def __init__(self, attn, sink):
    self.attn, self.sink = attn, sink

  def __call__(self, x, positions=None, segment_ids=None):
    self.sink.append(lowrank_layers.project_qkv(self.attn, x, positions))
    return self.attn(x, positions, segment_ids)


def capture_qkv(model, inputs, layer: int):
  """(q, k, v) of block `layer`'s attention on `inputs` (an eager
  forward; the model is left as it was)."""
  sink = []
  block = model.blocks[layer]
  original = block.attn
  block.attn = _Capture(original, sink)
  try:
    model(inputs)
  finally:
    block.attn = original
  return sink[0]


# --- training, drop-in, from scratch ----------------------------------------


def _attention_overrides(method: str, settings: Mapping[str, Any],
                         block: int) -> dict:
  if method == "dense":
    return {"attention.options": dict(block_size=block)}
  if method == "local":
    return {"attention.options": dict(window=settings["window"],
                                      block_size=block)}
  options = dict(settings)
  if method == "scatterbrain":
    options["block_size"] = block
  return {"attention.options": options}


def variants(arg: str, budget: int, causal: bool, block: int):
  """dense and the three methods at `budget`, as compare.Variants."""
  names = {"dense": "dense", "local": "sliding_window",
           "performer": "performer", "scatterbrain": "scatterbrain"}
  settings = method_settings(budget, causal)
  sep = "," if arg else ""
  return [compare.Variant(m, f"{arg}{sep}attention={names[m]}",
                          _attention_overrides(m, settings.get(m, {}), block))
          for m in ("dense",) + METHODS]


def evaluate_with(get_config, variant: compare.Variant, common, dense_dir):
  """Eval metrics of the dense checkpoint in dense_dir run with `variant`'s
  attention (no fine-tuning)."""
  config = compare.make_config(get_config, variant, common)
  exp = train.Experiment(config)
  state, _ = train.restore_state(exp, dense_dir)
  return exp.evaluate(state["params"])


def _model_inputs(get_config, variant, common, dense_dir, batch):
  """The dense model (restored) and one eval batch's model inputs."""
  config = compare.make_config(get_config, variant, common)
  exp = train.Experiment(config)
  state, _ = train.restore_state(exp, dense_dir)
  model = nnx.merge(exp.graphdef, state["params"], exp.consts)
  it = exp.iterator("eval", batch_size=batch)
  return model, exp.task.inputs(sharding.shard_batch(next(it), exp.mesh))


def model_study(name, get_config, arg, common, budget, causal, block,
                preset, workdir) -> dict:
  """Train every variant from scratch, then evaluate the dense checkpoint
  with each method, and measure the approximation error on one layer's
  q/k/v of the trained dense model."""
  vs = variants(arg, budget, causal, block)
  start = time.perf_counter()
  scratch = compare.run_variants(get_config, vs, os.path.join(workdir, name),
                                 common=common)
  dense_dir = os.path.join(workdir, name, "dense")
  drop_in = {"dense": scratch["dense"]["eval"]}
  for v in vs[1:]:
    drop_in[v.name] = evaluate_with(get_config, v, common, dense_dir)
  model, inputs = _model_inputs(get_config, vs[0], common, dense_dir,
                                preset.capture_batch)
  q, k, v = capture_qkv(model, inputs, preset.capture_layer)
  errors = approximation_errors(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
      causal=causal, budgets=preset.budgets, seeds=preset.seeds,
      source=f"{name} layer {preset.capture_layer}")
  return dict(from_scratch={n: dict(eval=r["eval"], wall_s=r["wall_s"],
                                    eval_loss=r["eval_loss"],
                                    train_loss=r["train_loss"],
                                    arg=r["arg"])
                            for n, r in scratch.items()},
              drop_in=drop_in, errors=errors, budget=budget,
              settings=method_settings(budget, causal),
              qkv_shape=list(q.shape), wall_s=time.perf_counter() - start)


def run(lm_config: Callable[[str], Any], vit_config: Callable[[str], Any],
        preset: Preset, workdir: str, out_dir: str) -> dict:
  """All three studies; writes out_dir/scatterbrain_eval.json and plots."""
  start = time.perf_counter()
  rows = []
  for t in preset.temperatures:
    q, k, v = random_qkv(preset, t)
    for causal in (False, True):
      rows += approximation_errors(
          q, k, v, causal=causal, budgets=preset.budgets, seeds=preset.seeds,
          source=f"random T={t} {'causal' if causal else 'bidir'}")
  lm_block = _block(preset.lm["seq_len"])
  out = dict(random_errors=rows, random_wall_s=time.perf_counter() - start)
  out["lm"] = model_study("lm", lm_config, "", preset.lm, preset.lm_budget,
                          True, lm_block, preset, workdir)
  vit_len = vit_tokens(vit_config, preset)
  out["vit"] = model_study("vit", vit_config, preset.vit_arg, preset.vit,
                           preset.vit_budget, False, _block(vit_len), preset,
                           workdir)
  out["wall_s"] = time.perf_counter() - start
  out["preset"] = dataclasses.asdict(preset)
  compare.save_json(out, os.path.join(out_dir, JSON_NAME))
  return out


def vit_tokens(vit_config, preset: Preset) -> int:
  config = compare.apply_overrides(vit_config(preset.vit_arg), preset.vit)
  h, w, _ = data.task_info(config.data)["image_shape"]
  p = config.model.patch_size
  return (h // p) * (w // p)


# --- tables and plots -------------------------------------------------------


METRICS = {"lm": "loss", "vit": "accuracy"}  # what each table reports


def tables(out: Mapping[str, Any]) -> str:
  """Markdown: errors per source and budget, drop-in and from-scratch."""
  lines = ["| source | budget | local | performer | scatterbrain | "
           "SB's parts alone: local / performer |", "|---|---|---|---|---|---|"]
  rows = out["random_errors"] + out["lm"]["errors"] + out["vit"]["errors"]
  by = {}
  for r in rows:
    by.setdefault((r["source"], r["budget"]), {})[r["method"]] = r["error"]
  for (src, b), e in by.items():
    best = min(e[m] for m in METHODS)
    cell = lambda m: (f"**{e[m]:.3f}**" if e[m] == best else f"{e[m]:.3f}")
    lines.append(f"| {src} | {b} | {cell('local')} | {cell('performer')} | "
                 f"{cell('scatterbrain')} | {e['local_part']:.3f} / "
                 f"{e['performer_part']:.3f} |")
  lines += ["", "| model | metric | dense | local | performer | scatterbrain |"
            " (drop-in / from scratch)", "|---|---|---|---|---|---|"]
  for name in ("lm", "vit"):
    study = out[name]
    metric = METRICS[name]
    cells = [f"{study['drop_in'][m][metric]:.3f} / "
             f"{study['from_scratch'][m]['eval'][metric]:.3f}"
             for m in ("dense",) + METHODS]
    lines.append(f"| {name} (budget {study['budget']}) | eval {metric} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(out: Mapping[str, Any], out_dir: str) -> list[str]:
  """errors.png (error vs budget per source) and models.png (drop-in and
  from-scratch metrics, eval curves)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = out["random_errors"] + out["lm"]["errors"] + out["vit"]["errors"]
  sources = list(dict.fromkeys(r["source"] for r in rows))
  cols = min(4, len(sources))
  nrows = -(-len(sources) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.3 * nrows),
                           squeeze=False)
  for ax, src in zip(axes.flat, sources):
    for i, m in enumerate(METHODS + PARTS):
      pts = sorted((r["budget"], r["error"], r["error_std"]) for r in rows
                   if r["source"] == src and r["method"] == m)
      b, e, sd = zip(*pts)
      ax.errorbar(b, e, yerr=sd, marker="o" if m in METHODS else ".",
                  ls="-" if m in METHODS else ":", color=f"C{i}",
                  label=m if m in METHODS else f"{m} (SB's)", capsize=2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(src, fontsize=9)
    ax.set_xlabel("budget (keys per query; 1 feature = 2 keys)", fontsize=8)
    ax.grid(alpha=0.3, which="both")
  for ax in axes.flat[len(sources):]:
    ax.axis("off")
  axes.flat[0].set_ylabel("relative error of the output")
  axes.flat[0].legend(fontsize=8)
  fig.suptitle("Attention output error vs exact softmax at equal budget")
  fig.tight_layout()
  paths = [os.path.join(out_dir, "errors.png")]
  fig.savefig(paths[0], dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  names = ("dense",) + METHODS
  for model, ax in zip(("lm", "vit"), axes[:2]):
    study = out[model]
    metric = METRICS[model]
    x = np.arange(len(names))
    ax.bar(x - 0.2, [study["drop_in"][n][metric] for n in names], 0.4,
           label="dense-trained, drop-in")
    ax.bar(x + 0.2, [study["from_scratch"][n]["eval"][metric]
                     for n in names], 0.4, label="trained from scratch")
    ax.set_xticks(x, names)
    ax.set_ylabel(f"eval {metric}")
    ax.set_title(f"{model} (budget {study['budget']})")
    ax.legend(fontsize=8)
    if metric == "loss":
      vals = [study["drop_in"][n][metric] for n in names]
      ax.set_ylim(0.9 * min(vals), None)
  for i, n in enumerate(names):
    pts = out["lm"]["from_scratch"][n]["train_loss"]
    if pts:
      s, l = zip(*pts)
      axes[2].plot(s, l, "-", color=f"C{i}", label=n)
  axes[2].set_xlabel("step")
  axes[2].set_ylabel("LM train loss (from scratch)")
  axes[2].set_ylim(None, 4.0)
  axes[2].legend(fontsize=8)
  axes[2].grid(alpha=0.3)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "models.png"))
  fig.savefig(paths[1], dpi=110)
  plt.close(fig)
  return paths
