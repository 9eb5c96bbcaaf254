"""Registry of attention implementations, chosen by name (impl=...).

Each entry knows the platforms it runs on; "auto" walks the platform's
preference list and logs once why it fell back. New kernels register here
with `register(...)`, never with an if/elif chain at the call site.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax

# fn(q, k, v, lists, cfg) -> (out, lse) on block-padded inputs.
AttentionFn = Callable


@dataclasses.dataclass(frozen=True)
class Implementation:
  name: str
  load: Callable[[], AttentionFn]  # lazy: kernels import only when used
  # (platform, device_kind) -> None if usable, else the reason it is not.
  unavailable: Callable[[str, str], Optional[str]] = lambda p, k: None
  # (dtype, head_dim, block_q, block_kv) -> None if it can run the problem,
  # else why not ("auto" then moves on to the next candidate).
  unsupported: Callable[..., Optional[str]] = lambda *problem: None
  supports_interpret: bool = False
  pad_head_dim_pow2: bool = False  # Triton needs power-of-two array sizes
  dense: bool = False  # needs no block padding (the dense reference)


_REGISTRY: Dict[str, Implementation] = {}
# Preference order for impl="auto" per platform.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "gpu": ("pallas_mosaic_gpu", "pallas_triton", "xla"),
    "tpu": ("pallas_tpu", "xla"),
    "cpu": ("xla",),
}
_WARNED = set()


def register(impl: Implementation) -> Implementation:
  _REGISTRY[impl.name] = impl
  return impl


def names() -> Sequence[str]:
  return tuple(_REGISTRY) + ("auto",)


def get(name: str) -> Implementation:
  if name not in _REGISTRY:
    raise ValueError(f"impl must be one of {sorted(names())}, got {name!r}")
  return _REGISTRY[name]


def _platform() -> Tuple[str, str]:
  dev = jax.devices()[0]
  return dev.platform, getattr(dev, "device_kind", "")


def resolve(name: str, interpret: bool,
            problem: Optional[Tuple] = None) -> Implementation:
  """The implementation to run for `name`, resolving "auto".

  problem: (dtype, head_dim, block_q, block_kv) of the call, checked against
  each candidate's `unsupported`.
  """
  def why_not(impl, platform, kind):
    reason = None if interpret else impl.unavailable(platform, kind)
    if reason is None and problem is not None:
      reason = impl.unsupported(*problem)
    return reason

  if name != "auto":
    impl = get(name)
    if interpret and not impl.supports_interpret:
      raise ValueError(f"interpret=True needs a Pallas implementation; "
                       f"impl={name!r} has no interpret mode")
    platform, kind = _platform()
    reason = why_not(impl, platform, kind)
    if reason is not None:
      raise ValueError(f"impl={name!r} cannot run here: {reason}")
    return impl
  platform, kind = _platform()
  skipped = []
  for candidate in AUTO_ORDER.get(platform, ("xla",)):
    impl = _REGISTRY.get(candidate)
    if impl is None:
      skipped.append(f"{candidate}: not built")
      continue
    reason = why_not(impl, platform, kind)
    if reason is None:
      if skipped and (platform, candidate, tuple(skipped)) not in _WARNED:
        _WARNED.add((platform, candidate, tuple(skipped)))
        logging.info("sparsejax impl='auto' picked %r on %s (%s)", candidate,
                     platform, "; ".join(skipped))
      return impl
    skipped.append(f"{candidate}: {reason}")
  return get("xla")
