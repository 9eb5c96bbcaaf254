"""GPU kernels (Pallas, Triton lowering)."""

import warnings

# jax 0.11 deprecates the Pallas Triton lowering (warning id jax-pallas-triton);
# these kernels use it on purpose (the fallback off Hopper and for shapes the
# Mosaic GPU kernel does not take), so the warning is filtered here, once, for
# every module of this package.
warnings.filterwarnings("ignore", message=".*Triton.*deprecated.*",
                        category=DeprecationWarning)
warnings.filterwarnings("ignore", module="jax._src.pallas.*",
                        category=DeprecationWarning)
