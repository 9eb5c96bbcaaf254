r"""Generates with a trained LM and a decode method chosen by name.

  python -m experiments.generate --config=configs/lm.py:attention=dense \
      --workdir=/tmp/lm_dense --method=quest \
      --method_options=token_budget=256,page_size=16 --prompt_len=200

Methods: dense, quest, double_sparsity, tidal, moa (see
`sparsejax.inference.methods`); --method_options are that method's fields
(k=v, Python literals). Double Sparsity and MoA calibrate on
--calib_batch random-needle sequences first. Without --workdir the model is
randomly initialised (a smoke run). With task=needle in the config the
prompts are needles and the exact-match rate is printed.
"""

import ast

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from sparsejax import data
from sparsejax import nn
from sparsejax.data import needle as needle_data
from sparsejax.evals import needle
from sparsejax.inference import generate
from sparsejax.inference import methods

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lm.py",
                                          "Model config (configs/lm.py).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Checkpoint dir (optional).")
_METHOD = flags.DEFINE_enum("method", "dense", methods.method_names(),
                            "Decode method.")
_OPTIONS = flags.DEFINE_list("method_options", [], "k=v method options.")
_BATCH = flags.DEFINE_integer("batch", 2, "Sequences.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 48, "Prompt tokens.")
_NEW = flags.DEFINE_integer("max_new_tokens", 8, "Tokens to generate.")
_CALIB = flags.DEFINE_integer("calib_batch", 2, "Calibration sequences.")
_SEED = flags.DEFINE_integer("seed", 0, "Prompt seed.")


def parse_options(items):
  """['a=1', 'b=x'] -> {'a': 1, 'b': 'x'} (Python literals when they parse)."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"method option {item!r} must be key=value")
    try:
      out[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key.strip()] = value
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  info = data.task_info(config.data)
  model = nn.build_model(config, info, seed=config.seed)
  if _WORKDIR.value:
    from flax import nnx  # pylint: disable=g-import-not-at-top
    nnx.update(model, needle.load_params(config, _WORKDIR.value))
  length = _PROMPT_LEN.value
  batch = needle_data.make_needle_batch(_SEED.value, _BATCH.value, length,
                                        None)
  calib = needle_data.make_needle_batch(_SEED.value + 1, _CALIB.value,
                                        length, None)["inputs"]
  gen = generate.Generator(model, _METHOD.value, batch=_BATCH.value,
                           max_len=length + _NEW.value, calib_tokens=calib,
                           **parse_options(_OPTIONS.value))
  lengths = np.full((_BATCH.value,), length, np.int32)
  if config.data.name == "needle":
    _, pred = gen.decode_nll(batch["inputs"], batch["targets"], lengths,
                             num_steps=2)
    hits = (pred == batch["targets"][:, -2:]).all(-1).mean()
    print(f"{_METHOD.value}: needle exact match {hits:.3f}")
  out = gen.generate(batch["inputs"], lengths, max_new_tokens=_NEW.value)
  print(f"{_METHOD.value} on {jax.devices()[0].device_kind}:")
  print(np.asarray(out))


if __name__ == "__main__":
  app.run(main)
