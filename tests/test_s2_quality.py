"""Fast checks of the quality evaluators (no long training)."""

import numpy as np
import pytest

from configs import lm
from sparsejax.evals import compare
from sparsejax.evals import needle
from sparsejax.nn import attention_registry

_LENGTHS = (64, 96)


def _tiny_config(**overrides):
  config = lm.get_config("attention=s2,small,task=needle")
  return compare.apply_overrides(config, {
      "model.num_layers": 2, "model.num_heads": 2, "model.num_kv_heads": 2,
      "attention.dense_every_n": 2, **overrides})


def test_oracle_scores_one_and_wrong_scores_zero():
  oracle = needle.needle_accuracy(
      {n: needle.oracle_predict for n in _LENGTHS}, depths=(0.0, 0.5, 1.0),
      num_examples=5, batch_size=2)
  assert oracle["lengths"] == list(_LENGTHS)
  for n in _LENGTHS:
    assert set(oracle["accuracy"][str(n)]) == {"0.0", "0.5", "1.0"}
    assert all(a == 1.0 for a in oracle["accuracy"][str(n)].values())
  # Off by one token: the metric must fail it.
  wrong = needle.needle_accuracy(
      {64: lambda x: needle.oracle_predict(x) + 1}, depths=(0.5,),
      num_examples=4)
  assert wrong["accuracy"]["64"]["0.5"] == 0.0
  # Half right: exact match 0, token accuracy 0.5.
  half = needle.needle_accuracy(
      {64: lambda x: needle.oracle_predict(x) * np.array([1, 0])},
      depths=(0.5,), num_examples=4)
  assert half["accuracy"]["64"]["0.5"] == 0.0
  assert half["token_accuracy"]["64"]["0.5"] == 0.5


def test_wrong_prediction_shape_is_an_error():
  with pytest.raises(ValueError, match="expected"):
    needle.needle_accuracy({64: lambda x: x}, depths=(0.5,), num_examples=1)


def test_untrained_model_at_two_lengths():
  config = _tiny_config()
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sparsejax import data, nn  # pylint: disable=g-import-not-at-top
  model = nn.build_model(config, data.task_info(config.data))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  fns = {n: needle.model_predict_fn(config, params, n) for n in _LENGTHS}
  pred = fns[96](np.zeros((3, 96), np.int32))
  assert pred.shape == (3, 2) and pred.dtype.kind == "i"
  result = needle.needle_accuracy(fns, depths=(0.0, 1.0), num_examples=2)
  for per_depth in result["accuracy"].values():
    assert all(0.0 <= a <= 1.0 for a in per_depth.values())


def test_hybrid_schedule_is_phi3_style():
  # Layer l dense iff (l + 1) % 2 == 0.
  assert attention_registry.layer_schedule(4, "s2", dense_every_n=2) == [
      "s2", "dense", "s2", "dense"]


def test_read_scalars_round_trip(tmp_path):
  import tensorboardX  # pylint: disable=g-import-not-at-top
  writer = tensorboardX.SummaryWriter(str(tmp_path / "tb"))
  for step, value in [(1, 3.0), (2, 2.5)]:
    writer.add_scalar("eval/loss", value, step)
  writer.close()
  assert compare.read_scalars(str(tmp_path))["eval/loss"] == [(1, 3.0),
                                                              (2, 2.5)]
  variant = compare.loss_variants()[2]
  config = compare.make_config(lm.get_config, variant, compare.LOSS_COMMON)
  assert config.attention.dense_every_n == 2
  assert config.attention.options.vert_stride <= config.model.num_kv_heads


def test_overriding_a_derived_field_keeps_its_origin():
  # eval_every = get_ref("num_train_steps") in configs/lm.py.
  config = compare.apply_overrides(lm.get_config("attention=dense"), {
      "num_train_steps": 180, "eval_every": 45})
  assert (config.num_train_steps, config.eval_every) == (180, 45)
  assert config.optimizer.decay_steps == 180  # still follows the origin
  assert config.checkpoint.every == 90
