"""Train several attention variants on the same model and data; collect losses.

Each variant is a `configs/lm.py` config with shared overrides (model size,
sequence length, steps) plus its own attention block, so the runs differ in
attention only. The curves are read back from the TensorBoard event files the
harness writes (`<workdir>/tb`), so a finished run can be re-read without
retraining.
"""

import copy
import dataclasses
import glob
import json
import os
import struct
import time
from typing import Any, Callable, Iterable, Mapping, Optional

from tensorboardX.proto import event_pb2

from sparsejax.training import train


@dataclasses.dataclass(frozen=True)
class Variant:
  """One run: a name, the `configs/lm.py` arg and config overrides.

  `overrides` maps dotted config paths ("attention.dense_every_n") to values;
  a dict value replaces a ConfigDict field wholesale (e.g. attention.options).
  """
  name: str
  arg: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def apply_overrides(config, overrides: Mapping[str, Any]):
  """A copy of `config` with dotted-path overrides applied.

  Derived fields (eval_every, decay_steps, ...) are their own references in
  configs/common.py, so overriding one leaves num_train_steps alone, and an
  override of num_train_steps still flows to the fields derived from it.
  """
  config = copy.deepcopy(config)
  with config.unlocked():
    for path, value in overrides.items():
      *parents, leaf = path.split(".")
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def make_config(get_config: Callable[[str], Any], variant: Variant,
                common: Mapping[str, Any]):
  """`get_config(variant.arg)` + common + variant overrides.

  `get_config` is a config file's function, e.g. `configs.lm.get_config`
  (passed in: the library does not import the configs/ tree).
  """
  config = get_config(variant.arg)
  return apply_overrides(config, {**common, **variant.overrides})


# Shared settings of the loss comparison: 4 layers, d_model 128, seq 512,
# 4 q / 4 kv heads so that the S2 shards (vert_stride 4) cover the context.
LOSS_COMMON = {
    "seq_len": 512,
    "batch_size": 8,
    "num_train_steps": 180,
    "model.num_layers": 4,
    "model.d_model": 128,
    "model.mlp_dim": 512,
    "model.num_heads": 4,
    "model.num_kv_heads": 4,
    "attention.impl": "xla",
    "log_every": 10,
    "eval_every": 45,
    "eval_steps": 8,
    "progress_bar": False,
}

# S2: 32-token blocks, a 2-block (64-token) local band and every 4th block;
# each of the 4 kv heads owns one residue class, so the heads' union covers
# the whole causal context.
S2_OPTIONS = dict(block_size=32, local_blocks=2, vert_stride=4,
                  num_dense_heads=0, homo_head=False, head_sliding_offset=0)


def loss_variants() -> list[Variant]:
  """dense, s2, and s2_hybrid (layer l dense iff (l + 1) % 2 == 0)."""
  s2 = {"attention.options": dict(S2_OPTIONS)}
  return [
      Variant("dense", "attention=dense",
              {"attention.options": dict(block_size=32)}),
      Variant("s2", "attention=s2", s2),
      Variant("s2_hybrid", "attention=s2",
              {**s2, "attention.dense_every_n": 2}),
  ]


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from the TensorBoard events in workdir/tb.

  Reads the TFRecord framing directly (no TensorFlow or tensorboard needed);
  later files win on repeated steps (a resumed run).
  """
  out: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(workdir, "tb", "events.*"))):
    with open(path, "rb") as f:
      while True:
        header = f.read(12)  # uint64 length + uint32 crc
        if len(header) < 12:
          break
        (length,) = struct.unpack("<Q", header[:8])
        payload = f.read(length)
        f.read(4)  # data crc
        if len(payload) < length:
          break  # a run still writing
        event = event_pb2.Event.FromString(payload)
        for value in event.summary.value:
          if value.HasField("simple_value"):
            out.setdefault(value.tag, {})[event.step] = value.simple_value
  return {tag: sorted(points.items()) for tag, points in out.items()}


def run_variants(get_config: Callable[[str], Any],
                 variants: Iterable[Variant], workdir: str, *,
                 common: Optional[Mapping[str, Any]] = None) -> dict:
  """Trains each variant in workdir/<name> and collects its results.

  A variant whose workdir already holds a finished run resumes at its end
  (the harness restores the checkpoint), so re-running only re-evaluates.

  Returns:
    {name: dict(eval=final eval metrics, step, wall_s, train_loss=[(step,
    loss)], eval_loss=[(step, loss)], config=the overrides)}.
  """
  common = LOSS_COMMON if common is None else common
  results = {}
  for variant in variants:
    config = make_config(get_config, variant, common)
    run_dir = os.path.join(workdir, variant.name)
    start = time.perf_counter()
    out = train.train_and_evaluate(config, run_dir)
    wall = time.perf_counter() - start
    scalars = read_scalars(run_dir)
    results[variant.name] = dict(
        eval=out["eval"], step=out["step"], wall_s=wall,
        train_loss=scalars.get("train/loss", out["history"]),
        eval_loss=scalars.get("eval/loss", []),
        arg=variant.arg, overrides={**common, **variant.overrides})
  return results


def relative_gap(results: Mapping[str, Mapping[str, Any]],
                 baseline: str = "dense") -> dict[str, float]:
  """(eval loss - baseline eval loss) / baseline eval loss, per variant."""
  base = results[baseline]["eval"]["loss"]
  return {name: (r["eval"]["loss"] - base) / base
          for name, r in results.items()}


def save_json(obj: Any, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=float)


def load_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)
