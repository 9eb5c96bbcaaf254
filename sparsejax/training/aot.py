"""Ahead-of-time compilation in background threads.

XLA releases the GIL while it compiles, so a pool of threads compiles several
executables at once while the caller goes on (e.g. trains on the shapes that
are ready). Lowering (tracing) runs on one background thread, in submission
order; the caller should not trace at the same time (running compiled
executables is fine).

Lowering is Python and holds the GIL for seconds; with the default 5 ms
switch interval a caller dispatching small steps beside it waits up to 5 ms
at every GIL hand-over. In CPU proxies (200 small jitted steps, 0.27 ms
alone) a step beside continuous lowering took 2.6-84 ms, and 0.8-1.4 ms with
a 0.2 ms interval. So while any lowering is pending, the process's switch
interval is `switch_interval` (default 0.2 ms; None leaves it), restored when
none is. On the H200 the needle LMs' training loops ran 5-10x slower while
their later compiles were lowered.

  compiler = aot.Compiler()
  compiler.submit("train/2048", jax.jit(step), state, batch_spec)
  out = compiler.get("train/2048")(state, batch)  # waits if not ready
"""

import concurrent.futures
import os
import sys
import threading
import time
from typing import Any, Callable, Hashable


class _SwitchInterval:
  """The process-wide GIL switch interval, short while any lowering of any
  Compiler is pending (a count, so Compilers may overlap)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._pending = 0
    self._saved = None

  def enter(self, seconds: float) -> None:
    with self._lock:
      if self._pending == 0:
        self._saved = sys.getswitchinterval()
        sys.setswitchinterval(min(self._saved, seconds))
      self._pending += 1

  def exit(self) -> None:
    with self._lock:
      self._pending -= 1
      if self._pending == 0:
        sys.setswitchinterval(self._saved)


_SWITCH = _SwitchInterval()


class Compiler:
  """Lowers and compiles in background threads, hands out executables."""

  def __init__(self, max_workers: int | None = None,
               switch_interval: float | None = 2e-4):
    if switch_interval is not None and not switch_interval > 0:
      raise ValueError("switch_interval must be None or > 0 seconds, got "
                       f"{switch_interval!r}")
    self._lower = concurrent.futures.ThreadPoolExecutor(1)
    self._pool = concurrent.futures.ThreadPoolExecutor(
        max_workers or min(16, os.cpu_count() or 1))
    self._switch = switch_interval
    self._futures: dict[Hashable, concurrent.futures.Future] = {}
    self.seconds: dict[Hashable, dict[str, float]] = {}  # lower/compile time
    self.wait_seconds = 0.0  # time callers spent blocked in `get`

  def submit(self, key: Hashable, jitted: Callable, *args: Any) -> None:
    """Queues `jitted` for `args` (arrays or jax.ShapeDtypeStruct)."""
    if self._switch is not None:
      _SWITCH.enter(self._switch)
    try:
      self._futures[key] = self._lower.submit(self._lower_one, key, jitted,
                                              args)
    except BaseException:  # e.g. submitted after close(): nothing pending
      if self._switch is not None:
        _SWITCH.exit()
      raise

  def _lower_one(self, key, jitted, args):
    try:
      start = time.perf_counter()
      lowered = jitted.lower(*args)
      self.seconds[key] = dict(lower=time.perf_counter() - start)
    finally:
      if self._switch is not None:
        _SWITCH.exit()
    return self._pool.submit(self._compile_one, key, lowered)

  def _compile_one(self, key, lowered):
    start = time.perf_counter()
    compiled = lowered.compile()
    self.seconds[key]["compile"] = time.perf_counter() - start
    return compiled

  def get(self, key: Hashable) -> Callable:
    """The compiled executable for `key` (blocks until it is ready; the
    time blocked adds to `wait_seconds`)."""
    start = time.perf_counter()
    try:
      return self._futures[key].result().result()
    finally:
      self.wait_seconds += time.perf_counter() - start

  def close(self) -> None:
    """Waits for the queued work (errors stay with `get`), then stops."""
    self._lower.shutdown(wait=True)
    self._pool.shutdown(wait=True)


class WorkClock:
  """Seconds since creation, less the time spent waiting in `compiler.get`
  meanwhile: a training budget that compile waits (they vary with the host)
  do not use up."""

  def __init__(self, compiler: Compiler):
    self._compiler = compiler
    self._start = time.perf_counter()
    self._waited0 = compiler.wait_seconds

  @property
  def waited(self) -> float:
    return self._compiler.wait_seconds - self._waited0

  @property
  def wall(self) -> float:
    return time.perf_counter() - self._start

  def seconds(self) -> float:
    return self.wall - self.waited
