"""End-to-end training: tiny runs, exact resume, checkpoint damage, NaN guard."""

import glob
import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm as lm_config
from configs import vit as vit_config
from sparsejax import training
from sparsejax.evals import compare
from sparsejax.training import checkpoints


def tiny_config(**overrides):
  config = lm_config.get_config("small")
  config.unlock()
  config.model.d_model = 32
  config.model.num_layers = 1
  config.batch_size = 4
  config.eval_batch_size = 4
  config.eval_steps = 1
  config.num_train_steps = 6
  config.log_every = 1
  config.checkpoint.every = 3
  config.checkpoint.keep = 3
  config.progress_bar = False
  return compare.apply_overrides(config, overrides)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  return workdir, training.train_and_evaluate(tiny_config(), workdir)


def test_end_to_end(full_run):
  workdir, result = full_run
  steps, losses = zip(*result["history"])
  assert steps == (1, 2, 3, 4, 5, 6)
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  assert {"loss", "perplexity", "accuracy"} <= set(result["eval"])
  assert glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  every=3, keep=3)
  assert ckpt.all_steps() == [3, 6]


def test_evaluate_checkpoint_matches_final_eval(full_run):
  workdir, result = full_run
  metrics = training.evaluate(tiny_config(), workdir)
  assert metrics.pop("step") == 6
  for key, value in result["eval"].items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-6)


def test_resume_is_exact(full_run, tmp_path):
  _, result = full_run
  first = training.train_and_evaluate(tiny_config(), str(tmp_path),
                                      max_steps=3)
  assert first["step"] == 3
  second = training.train_and_evaluate(tiny_config(), str(tmp_path))
  resumed = first["history"] + second["history"]
  # Same data order and optimizer state: bitwise-equal losses on CPU.
  np.testing.assert_array_equal(np.array(resumed), np.array(result["history"]))


def test_corrupt_checkpoint_is_a_clear_error(full_run, tmp_path):
  workdir, _ = full_run
  copy = tmp_path / "checkpoints"
  os.system(f"cp -r {workdir}/checkpoints {copy}")
  for f in glob.glob(str(copy / "6" / "state" / "**" / "*"), recursive=True):
    if os.path.isfile(f) and "metadata" not in os.path.basename(f):
      with open(f, "wb") as fh:
        fh.write(b"garbage")
  config = tiny_config()
  with pytest.raises(training.CheckpointError, match=r"step 6 .*\[3\]"):
    training.evaluate(config, str(tmp_path))
  # The previous good checkpoint stays usable.
  assert training.evaluate(config, str(tmp_path), step=3)["step"] == 3


class _Iterator:
  """Minimal grain-like iterator whose state can fail to serialise."""

  def __init__(self, fail=False):
    self.fail, self.position = fail, 0

  def get_state(self):
    if self.fail:
      raise OSError("disk full (simulated)")
    return str(self.position).encode()

  def set_state(self, state):
    self.position = int(state.decode())

  def start_prefetch(self):
    pass


def test_interrupted_save_keeps_latest_readable(tmp_path):
  state = dict(w=jnp.arange(4.0), step=jnp.int32(1))
  ckpt = checkpoints.Checkpointer(str(tmp_path), every=1, keep=3)
  ckpt.save(1, state, _Iterator(), force=True)
  with pytest.raises(OSError, match="disk full"):
    ckpt.save(2, dict(w=jnp.ones(4), step=jnp.int32(2)), _Iterator(fail=True),
              force=True)
  ckpt.close()
  assert glob.glob(str(tmp_path / "2.orbax-checkpoint-tmp*"))  # the debris
  reopened = checkpoints.Checkpointer(str(tmp_path), every=1, keep=3)
  assert reopened.all_steps() == [1]
  it = _Iterator()
  it.position = 99
  restored, step = reopened.restore(state, it)
  assert step == 1 and it.position == 0
  np.testing.assert_array_equal(restored["w"], np.arange(4.0))


def test_nan_guard_names_step_and_metric(tmp_path):
  config = tiny_config(**{"optimizer.learning_rate": 1e30,
                          "optimizer.warmup_steps": 1,
                          "optimizer.clip_norm": 0.0})
  with pytest.raises(training.NonFiniteError,
                     match=r"non-finite \w+=(nan|inf|-inf) at step \d"):
    training.train_and_evaluate(config, str(tmp_path))
  assert not glob.glob(str(tmp_path / "checkpoints" / "[0-9]*"))


def test_config_errors():
  with pytest.raises(ValueError, match="valid keys: attention, small, task"):
    lm_config.get_config("attn=s2")
  with pytest.raises(ValueError, match="valid names"):
    training.train_and_evaluate(tiny_config(**{"attention.name": "nope"}),
                                "/tmp/unused_workdir")


def test_vit_pathfinder_runs(tmp_path):
  config = vit_config.get_config("small,attention=s2")
  config.num_train_steps, config.eval_steps = 2, 1
  config.progress_bar = False
  result = training.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= result["eval"]["accuracy"] <= 1.0
  assert np.isfinite(result["eval"]["loss"])


def test_derived_config_fields_follow_overrides():
  config = lm_config.get_config("")
  config.num_train_steps = 1000
  config.model.d_model = 64
  assert config.optimizer.decay_steps == 1000
  assert config.optimizer.warmup_steps == 100
  assert config.checkpoint.every == 500
  assert config.model.mlp_dim == 256


def test_derived_config_fields_do_not_alias_their_source():
  """Overriding a derived field must not rewrite the field it derives from."""
  from configs import lm, vit
  for get_config in (lm.get_config, vit.get_config):
    config = get_config(None)
    config.num_train_steps = 180
    config.eval_every = 45
    config.eval_batch_size = 2
    config.optimizer.decay_steps = 100
    assert config.num_train_steps == 180
    assert config.batch_size != 2 or config.eval_batch_size == 2
    assert config.checkpoint.every == 90
    config.batch_size = 16
    assert config.eval_batch_size == 2
