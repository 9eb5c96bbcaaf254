"""Helpers shared by the config files (big_vision style)."""

import ml_collections


def _parse_value(key: str, text: str, default):
  """Parses `text` to the type of `default` (str when the default is None)."""
  if isinstance(default, bool):
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
      raise ValueError(f"config arg {key}={text!r}: expected a bool")
    return lowered in ("true", "1", "yes")
  if default is None or isinstance(default, str):
    return text
  try:
    return type(default)(text)
  except ValueError as e:
    raise ValueError(f"config arg {key}={text!r}: expected "
                     f"{type(default).__name__}") from e


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """Parses the string after `config.py:` into typed fields.

  `parse_arg("attention=s2,small", attention="dense", small=False)` gives
  attention="s2", small=True: `key=value` is cast to the default's type, a
  bare `key` sets a bool default to True. Unknown keys are an error listing
  the valid ones.

  Args:
    arg: the config argument string; None or "" keeps all defaults.
    **defaults: the valid keys and their default values.

  Returns:
    A ConfigDict with every key of `defaults`.
  """
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, has_value, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; valid keys: "
                       f"{', '.join(sorted(defaults))}")
    if has_value:
      out[key] = _parse_value(key, text.strip(), defaults[key])
    elif isinstance(defaults[key], bool):
      out[key] = True
    else:
      raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
  return ml_collections.ConfigDict(out)


def default_options(name: str, *, block_size: int) -> dict:
  """Options of a variant the config file has no entry for: a block size for
  mask variants; for layer variants, their factory's keyword defaults (so
  --config.attention.options.x=... can override each)."""
  import inspect  # pylint: disable=g-import-not-at-top
  from sparsejax.nn import attention_registry  # pylint: disable=g-import-not-at-top
  if not attention_registry.is_layer_variant(name):
    return dict(block_size=block_size)
  params = inspect.signature(attention_registry.get(name)).parameters
  return {k: p.default for k, p in params.items()
          if isinstance(p.default, (bool, int, float, str))}


def attention_config(name: str, options: dict) -> ml_collections.ConfigDict:
  """The `attention` section: variant name and options, impl, soft-cap and
  the per-layer schedule (see sparsejax.nn.attention_registry)."""
  # interpret: run a Pallas impl in interpret mode (CPU tests).
  config = ml_collections.ConfigDict(dict(
      name=name, impl="auto", interpret=False, options=options,
      dense_every_n=0, dense_first=0, dense_last=0))
  config.soft_cap = ml_collections.config_dict.placeholder(float)
  config.layers = ml_collections.config_dict.placeholder(str)
  return config


def add_training_defaults(config: ml_collections.ConfigDict, *, optimizer: dict,
                          log_every: int, eval_steps: int) -> None:
  """Optimizer, logging, eval, checkpoint and mesh fields every experiment has.

  Step counts are derived from `num_train_steps` and `batch_size`, so they
  follow command-line overrides. Each is a new reference (`* 1`): assigning a
  bare get_ref would alias the field, and overriding eval_every would then
  rewrite num_train_steps.
  """
  config.optimizer = ml_collections.ConfigDict(dict(optimizer))
  config.optimizer.warmup_steps = config.get_ref("num_train_steps") // 10
  config.optimizer.decay_steps = config.get_ref("num_train_steps") * 1
  config.log_every = log_every
  config.eval_every = config.get_ref("num_train_steps") * 1
  config.eval_steps = eval_steps
  config.eval_batch_size = config.get_ref("batch_size") * 1
  config.checkpoint = ml_collections.ConfigDict(dict(
      every=config.get_ref("num_train_steps") // 2, keep=2, async_save=False))
  # Sizes of the data / fsdp / tensor / context mesh axes; -1 takes the
  # rest. context > 1 splits sequences: attention runs a K/V ring over it
  # (sparsejax.parallel; seq_len must split into whole mask blocks).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1,
                                               context=1))
  # Peak FLOP/s of one device for the MFU estimate (None: look it up, or
  # report TFLOP/s only).
  config.peak_flops = ml_collections.config_dict.placeholder(float)
  config.progress_bar = True
  # A regex on parameter paths: only matching params train (e.g. "attn/gate/"
  # for SeerAttention's distillation); None trains everything.
  config.trainable = ml_collections.config_dict.placeholder(str)
  # A workdir whose latest checkpoint's params initialise a new run (the
  # params it has; e.g. a dense LM under SeerAttention gates).
  config.init_from = ml_collections.config_dict.placeholder(str)
