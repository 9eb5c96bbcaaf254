"""Ahead-of-time compilation in background threads.

XLA releases the GIL while it compiles, so a pool of threads compiles several
executables at once while the caller goes on (e.g. trains on the shapes that
are ready). Lowering (tracing) runs on one background thread, in submission
order; the caller should not trace at the same time (running compiled
executables is fine).

  compiler = aot.Compiler()
  compiler.submit("train/2048", jax.jit(step), state, batch_spec)
  out = compiler.get("train/2048")(state, batch)  # waits if not ready
"""

import concurrent.futures
import os
import time
from typing import Any, Callable, Hashable


class Compiler:
  """Lowers and compiles in background threads, hands out executables."""

  def __init__(self, max_workers: int | None = None):
    self._lower = concurrent.futures.ThreadPoolExecutor(1)
    self._pool = concurrent.futures.ThreadPoolExecutor(
        max_workers or min(16, os.cpu_count() or 1))
    self._futures: dict[Hashable, concurrent.futures.Future] = {}
    self.seconds: dict[Hashable, dict[str, float]] = {}  # lower/compile time

  def submit(self, key: Hashable, jitted: Callable, *args: Any) -> None:
    """Queues `jitted` for `args` (arrays or jax.ShapeDtypeStruct)."""
    self._futures[key] = self._lower.submit(self._lower_one, key, jitted, args)

  def _lower_one(self, key, jitted, args):
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    self.seconds[key] = dict(lower=time.perf_counter() - start)
    return self._pool.submit(self._compile_one, key, lowered)

  def _compile_one(self, key, lowered):
    start = time.perf_counter()
    compiled = lowered.compile()
    self.seconds[key]["compile"] = time.perf_counter() - start
    return compiled

  def get(self, key: Hashable) -> Callable:
    """The compiled executable for `key` (blocks until it is ready)."""
    return self._futures[key].result().result()

  def close(self) -> None:
    """Waits for the queued work (errors stay with `get`), then stops."""
    self._lower.shutdown(wait=True)
    self._pool.shutdown(wait=True)
