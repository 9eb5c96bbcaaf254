"""The long-context needle run: data, schedule, padding, presets, end to end."""

import dataclasses
import types

from flax import nnx
import jax
import numpy as np

from configs import lm
import sparsejax as sj
from sparsejax import data
from sparsejax import nn
from sparsejax.data import needle as needle_data
from sparsejax.evals import compare
from sparsejax.evals import needle
from sparsejax.evals import needle_long
from sparsejax.nn import attention_registry

_TINY = dataclasses.replace(
    needle_long.PRESETS["smoke"], train_lengths=(32, 64), tokens_per_step=256,
    steps=6, eval_lengths=(64,), eval_examples=2, depths=(0.0, 1.0),
    log_every=3)


def _check_needles(batch, *, depth=None, key_len=2, value_len=2):
  inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]
  b, n = inputs.shape
  span = 2 + key_len + value_len
  for i in range(b):
    pos = int(batch["needle_pos"][i])
    if depth is not None:  # where the docstring says the depth puts it
      assert pos == round(depth * (n + 1 - 2 * span))
    needle = inputs[i, pos:pos + span]
    query = np.append(inputs[i, n + 1 - span:], targets[i, -1])
    assert needle[0] == needle_data.NEEDLE and query[0] == needle_data.QUERY
    assert needle[1 + key_len] == query[1 + key_len] == needle_data.ARROW
    np.testing.assert_array_equal(needle[1:], query[1:])  # key and value
    # Markers are unique, so only the needle tells the answer.
    assert (inputs[i] == needle_data.NEEDLE).sum() == 1
    assert (inputs[i] == needle_data.ARROW).sum() == 2
    # The loss covers exactly the answer: targets there are the value.
    np.testing.assert_array_equal(np.flatnonzero(mask[i]),
                                  np.arange(n - value_len, n))
    np.testing.assert_array_equal(targets[i, mask[i] > 0],
                                  needle[-value_len:])


def test_needle_batches_hold_the_needle_where_claimed():
  for depth in (0.0, 0.5, 1.0):
    _check_needles(data.make_needle_batch(3, 4, 200, depth), depth=depth)
  train = needle_long.train_batch(_TINY, 5, 64)
  assert train["inputs"].shape == (256 // 64, 64)
  full = data.make_needle_batch(
      needle_long._TRAIN_SEED_BASE + 5, 4, 64, None)  # what train_batch draws
  np.testing.assert_array_equal(train["inputs"], full["inputs"])
  _check_needles(full)


def test_length_schedule_starts_short_and_reaches_every_length():
  preset = dataclasses.replace(_TINY, train_lengths=(32, 64, 128),
                               steps=300, unlock_frac=0.5)
  lengths = needle_long.length_schedule(preset)
  assert len(lengths) == 300
  assert set(lengths[:75]) == {32}  # 64 unlocks at step 75, 128 at 150
  assert set(lengths[:150]) == {32, 64}
  assert set(lengths[150:]) == {32, 64, 128}
  np.testing.assert_array_equal(lengths, needle_long.length_schedule(preset))


def test_end_padding_is_exact_under_causal_attention():
  config = compare.apply_overrides(
      lm.get_config("attention=s2,small,task=needle"),
      {"attention.dense_every_n": 2, "attention.impl": "xla",
       "attention.options.block_size": 16})
  info = data.task_info(config.data)
  batch = data.make_needle_batch(0, 3, 64, 0.5)
  logits = {}
  for n in (64, 128):
    graphdef, state = nnx.split(nn.build_model(needle.with_seq_len(config, n),
                                               info))
    forward = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))
    padded, _ = needle.pad_inputs(batch["inputs"], n)
    logits[n] = np.asarray(forward(state, padded))[:, :64]
  np.testing.assert_allclose(logits[64], logits[128], atol=1e-5, rtol=1e-5)
  model = nn.build_model(config, info)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  predict = needle.model_predict_fn(config, params, 128)
  np.testing.assert_array_equal(predict(batch["inputs"]),
                                logits[64][:, -2:].argmax(-1))


def test_gpu_preset_shapes_and_pattern():
  preset = needle_long.PRESETS["gpu"]
  assert all(preset.tokens_per_step % n == 0 for n in preset.train_lengths)
  assert max(preset.eval_lengths) <= max(preset.train_lengths)
  assert preset.eval_lengths == (2048, 4096, 8192, 16384, 32768)
  m = preset.model
  mask = sj.masks.s2(32768, m["model.num_heads"],
                     num_kv_heads=m["model.num_kv_heads"], **preset.s2_options)
  assert sj.masks.s2_coverage(mask)["covers_all"]
  assert attention_registry.layer_schedule(
      m["model.num_layers"], "s2", dense_every_n=2) == [
          "s2", "dense", "s2", "dense"]


def test_deadline_or_failure_stops_training_and_says_why():
  out = needle_long._train([], _TINY, None, deadline=0.0)
  assert out["steps_done"] == 0 and out["stopped_early"]
  assert "max_minutes" in out["stopped_reason"]

  class BrokenCompiler:
    def get(self, key):
      raise RuntimeError(f"no executable for {key}")

  model = types.SimpleNamespace(name="m", state=None, consts={})
  out = needle_long._train([model], _TINY, BrokenCompiler(), deadline=1e12)
  assert out["steps_done"] == 0
  assert out["stopped_reason"].startswith("RuntimeError: no executable")


def test_smoke_run_end_to_end(tmp_path):
  out = needle_long.run(lm.get_config, _TINY, str(tmp_path))
  saved = compare.load_json(str(tmp_path / needle_long.JSON_NAME))
  assert saved["steps_done"] == 6 and not saved["stopped_early"]
  assert saved["same_init"] and saved["lengths"] == [64]
  assert sum(saved["steps_per_length"].values()) == 6
  assert set(saved["models"]) == {"dense", "s2_hybrid"}
  for m in saved["models"].values():
    acc = m["accuracy"]["64"]
    assert set(acc) == {"0.0", "1.0"}
    assert all(0.0 <= a <= 1.0 for a in acc.values())
    assert [s for s, _, _ in m["train_loss"]] == list(range(1, 7))
    assert all(np.isfinite(loss) for _, _, loss in m["train_loss"])
    assert m["overrides"]["attention.impl"] == "auto"
  assert saved["seconds"]["total"] > 0
  assert out["models"]["dense"]["accuracy"] == saved["models"]["dense"][
      "accuracy"]
  for name in ("needle_long_accuracy.png", "needle_long_heatmaps.png"):
    assert (tmp_path / name).stat().st_size > 0
