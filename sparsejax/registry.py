"""One registry mechanism for every op: implementations chosen by `impl=`.

Each op family (block-sparse attention, lightning attention, scatterbrain,
decode, ...) owns an `OpRegistry`; its implementations register under the
shared names ("reference", "xla", "pallas_triton", "pallas_mosaic_gpu",
"pallas_tpu") and "auto" walks the same per-platform preference order for
every op, logging once why it fell back. New kernels register with
`registry.register(Implementation(...))`, never with an if/elif chain at the
call site.

The platform is the first device's, unless `target_platform(...)` says
otherwise: that is how a CPU host lowers a GPU kernel ahead of time
(`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax

# Preference order for impl="auto" per platform, the same for every op; an op
# that lacks an implementation simply skips its name.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "gpu": ("pallas_mosaic_gpu", "pallas_triton", "xla"),
    "tpu": ("pallas_tpu", "xla"),
    "cpu": ("xla",),
}
IMPL_NAMES = ("reference", "xla", "pallas_triton", "pallas_mosaic_gpu",
              "pallas_tpu")


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One way to run an op.

  Attributes:
    name: one of IMPL_NAMES.
    load: () -> the op's function; lazy, so kernels import only when used.
    unavailable: (platform, device_kind) -> None if usable, else why not.
    unsupported: (*problem) -> None if it can run this call, else why not
      ("auto" then moves on). `problem` is op-specific (dtype, sizes, ...).
    supports_interpret: runs on CPU with interpret=True (Pallas).
    pad_head_dim_pow2: needs power-of-two head_dim (Triton array sizes).
    dense: the dense reference (no block padding).
  """
  name: str
  load: Callable[[], Any]
  unavailable: Callable[[str, str], Optional[str]] = lambda p, k: None
  unsupported: Callable[..., Optional[str]] = lambda *problem: None
  supports_interpret: bool = False
  pad_head_dim_pow2: bool = False
  dense: bool = False


_TARGET = threading.local()


@contextlib.contextmanager
def target_platform(platform: str, device_kind: str = ""):
  """Resolve `impl=` for `platform` ("gpu", "tpu", "cpu") inside the block.

  Use it to lower for another platform than the host's, e.g. on a CPU host:

    with sj.target_platform("gpu", "NVIDIA H200"):
      jax.jit(f).trace(q, k, v).lower(lowering_platforms=("cuda",))
  """
  if platform not in AUTO_ORDER:
    raise ValueError(f"platform must be one of {sorted(AUTO_ORDER)}, got "
                     f"{platform!r}")
  previous = getattr(_TARGET, "value", None)
  _TARGET.value = (platform, device_kind)
  try:
    yield
  finally:
    _TARGET.value = previous


def platform() -> Tuple[str, str]:
  """(platform, device_kind) that `impl` resolves for."""
  target = getattr(_TARGET, "value", None)
  if target is not None:
    return target
  dev = jax.devices()[0]
  return dev.platform, getattr(dev, "device_kind", "")


class OpRegistry:
  """The implementations of one op, by name."""

  def __init__(self, op: str):
    self.op = op
    self._impls: Dict[str, Implementation] = {}
    self._warned = set()

  def register(self, impl: Implementation) -> Implementation:
    if impl.name not in IMPL_NAMES:
      raise ValueError(f"implementation name must be one of {IMPL_NAMES}, "
                       f"got {impl.name!r}")
    self._impls[impl.name] = impl
    return impl

  def names(self) -> Sequence[str]:
    return tuple(self._impls) + ("auto",)

  def get(self, name: str) -> Implementation:
    if not isinstance(name, str) or name not in self._impls:
      raise ValueError(f"impl must be one of "
                       f"{sorted(self.names())} for {self.op}, got {name!r}")
    return self._impls[name]

  def resolve(self, name: str, interpret: bool = False,
              problem: Optional[Tuple] = None) -> Implementation:
    """The implementation to run for `name`, resolving "auto".

    problem: the op-specific description of the call, checked against each
    candidate's `unsupported`.
    """
    plat, kind = platform()

    def why_not(impl):
      reason = None if interpret else impl.unavailable(plat, kind)
      if reason is None and problem is not None:
        reason = impl.unsupported(*problem)
      return reason

    if name != "auto":
      impl = self.get(name)
      if interpret and not impl.supports_interpret:
        raise ValueError(f"interpret=True needs a Pallas implementation; "
                         f"impl={name!r} of {self.op} has no interpret mode")
      reason = why_not(impl)
      if reason is not None:
        raise ValueError(f"impl={name!r} cannot run {self.op} here: {reason}"
                         + ("" if plat != "cpu" or interpret else
                            " (to lower for another platform from this host, "
                            "wrap the call in sparsejax.target_platform(...))"))
      return impl
    skipped = []
    for candidate in AUTO_ORDER.get(plat, ("xla",)):
      impl = self._impls.get(candidate)
      if impl is None:
        continue
      reason = why_not(impl)
      if reason is None:
        key = (plat, candidate, tuple(skipped))
        if skipped and key not in self._warned:
          self._warned.add(key)
          logging.info("sparsejax %s impl='auto' picked %r on %s (%s)",
                       self.op, candidate, plat, "; ".join(skipped))
        return impl
      skipped.append(f"{candidate}: {reason}")
    return self.get("xla")
