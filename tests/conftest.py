import os

import hypothesis
import jax

# Tests compare against an f32 reference; keep XLA from using lower precision.
jax.config.update("jax_default_matmul_precision", "highest")
hypothesis.settings.register_profile("ci", deadline=None, max_examples=5,
                                     derandomize=True, print_blob=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False
