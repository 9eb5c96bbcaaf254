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
