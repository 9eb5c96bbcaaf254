"""Vision layers, MaxViT and the digits task train on CPU (tiny)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import maxvit as maxvit_config
from configs import vit as vit_config
from sparsejax import data
from sparsejax import nn
from sparsejax import training
from sparsejax.data import digits


def test_digits_split_leaks_nothing():
  tr_x, tr_y, te_x, te_y = digits.digits_split(seed=0)
  assert len(tr_x) + len(te_x) <= 1797 and len(te_x) > 300
  seen = {x.tobytes() for x in tr_x}
  assert not any(x.tobytes() in seen for x in te_x)
  assert set(np.unique(te_y)) == set(range(10))
  assert tr_x.dtype == np.uint8 and tr_x.max() > 200


@pytest.mark.parametrize("attention", ["maxvit_block", "maxvit_grid",
                                       "neighborhood", "routing"])
def test_vit_variant_forward_and_grad(attention):
  config = vit_config.get_config(f"attention={attention},small")
  info = dict(image_shape=(32, 32, 1), num_classes=2, kind="image_cls")
  model = nn.build_model(config, info)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
  logits = model(images)
  assert logits.shape == (2, 2) and np.isfinite(np.asarray(logits)).all()
  assert model.flops_per_token() > 0


def test_maxvit_t_shapes():
  config = maxvit_config.get_config("")
  model = jax.eval_shape(lambda: nn.build_model(
      config, dict(image_shape=(224, 224, 3), num_classes=1000)))
  del model  # construction validates every stage's window (56/28/14/7 by 7)


def test_maxvit_trains_on_digits(tmp_path):
  config = maxvit_config.get_config("small")
  # One stage of one block (MBConv + block + grid attention): CI time.
  config.model.update(widths=(16,), depths=(1,), stem_width=16,
                      window=(4,), stage_strides=(1,))
  config.num_train_steps = 16
  config.batch_size = 16
  config.log_every = 8
  config.checkpoint.every = 16  # one save, at the end
  config.eval_steps = 1
  config.progress_bar = False
  config.data.data_dir = str(tmp_path / "tfds")
  out = training.train_and_evaluate(config, str(tmp_path / "run"))
  losses = [l for _, l in out["history"]]
  assert losses[-1] < losses[0]
  assert 0.0 <= out["eval"]["accuracy"] <= 1.0


def test_quality_variants_differ_in_attention_only(tmp_path):
  """experiments/vision_quality.py's configs: the ViTs share all but the
  attention layer; the plot draws from the results JSON."""
  from sparsejax.evals import compare  # pylint: disable=g-import-not-at-top
  from sparsejax.vision import quality  # pylint: disable=g-import-not-at-top
  spec = quality.PRESETS["cpu"]
  configs = {name: compare.make_config(
      maxvit_config.get_config if name == "maxvit" else vit_config.get_config,
      quality.variant(name, spec), spec["common"])
             for name in quality.VARIANTS}
  vits = [configs[n] for n in quality.VIT_VARIANTS]
  assert {c.attention.name for c in vits} == set(quality.VIT_VARIANTS)
  strip = lambda c: {k: v for k, v in c.to_dict().items() if k != "attention"}
  assert all(strip(c) == strip(vits[0]) for c in vits)
  assert vits[0].model.patch_size == 1 and vits[0].data.name == "digits"
  assert configs["maxvit"].model.name == "maxvit"
  with pytest.raises(ValueError, match="variant"):
    quality.variant("nope", spec)
  run = dict(eval=dict(accuracy=0.5), train_loss=[(1, 2.0), (2, 1.0)],
             eval_accuracy=[(2, 0.5)])
  path = quality.plot(dict(preset="cpu", test_examples=359,
                           runs={"dense": run}), str(tmp_path / "q.png"))
  assert (tmp_path / "q.png").stat().st_size > 0 and path.endswith("q.png")
