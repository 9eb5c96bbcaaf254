import os

import hypothesis
import jax

# Tests compare against an f32 reference; keep XLA from using lower precision.
jax.config.update("jax_default_matmul_precision", "highest")
# The shared suite's property test runs from one subclass per implementation
# (they differ only in IMPL), which Hypothesis flags as differing executors;
# examples are derandomised, so replays stay reproducible.
hypothesis.settings.register_profile(
    "ci", deadline=None, max_examples=5, derandomize=True, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.differing_executors])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False
