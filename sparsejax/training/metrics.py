"""Metric sinks: TensorBoard event files, console progress bar, NaN guard."""

import json
import math
import os
import time
from typing import Mapping, Optional

import jax
import tensorboardX
import tqdm

# Dense bf16 peak FLOP/s per device, for the MFU estimate.
PEAK_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


# Logged to TensorBoard but left off the console line to keep it short.
_TB_ONLY = frozenset({"param_norm", "update_norm", "step_time_s"})


class NonFiniteError(FloatingPointError):
  """A training metric became NaN or inf."""


def check_finite(step: int, values: Mapping[str, float]) -> None:
  """Raises NonFiniteError naming the step and the first bad metric."""
  for name, value in values.items():
    if not math.isfinite(float(value)):
      raise NonFiniteError(f"non-finite {name}={value} at step {step}; "
                           "stopping (lower the learning rate, check data)")


def peak_flops(override: Optional[float] = None) -> Optional[float]:
  """Peak FLOP/s of one device: the config value, else the table, else None."""
  if override:
    return float(override)
  return PEAK_FLOPS.get(jax.devices()[0].device_kind)


class Writer:
  """Writes scalars to TensorBoard (process 0 only) and a console bar."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int,
               progress_bar: bool = True):
    self._main = jax.process_index() == 0
    self._tb = (tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))
                if self._main else None)
    # The same scalars as JSON lines: easy to plot without TensorBoard.
    self._jsonl = (open(os.path.join(workdir, "metrics.jsonl"), "a")
                   if self._main else None)
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step,
                          disable=not (self._main and progress_bar),
                          dynamic_ncols=True, desc="train")

  def write(self, step: int, scalars: Mapping[str, float],
            prefix: str = "") -> None:
    """Logs scalars at `step` (names get `prefix/`)."""
    if not self._main:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(f"{prefix}{name}", float(value), step)
    self._jsonl.write(json.dumps({"step": step, **{
        f"{prefix}{k}": float(v) for k, v in scalars.items()}}) + "\n")
    self._jsonl.flush()
    shown = {k: v for k, v in scalars.items() if k not in _TB_ONLY}
    text = ", ".join(f"{prefix}{k}={_fmt(v)}" for k, v in shown.items())
    tqdm.tqdm.write(f"step {step}: {text}")  # above the bar, if any

  def progress(self, step: int, postfix: Mapping[str, float]) -> None:
    self._bar.n = step
    self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()},
                          refresh=True)

  def close(self):
    self._bar.close()
    if self._tb is not None:
      self._tb.close()
      self._jsonl.close()


def _fmt(v) -> str:
  v = float(v)
  return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


class StepTimer:
  """Throughput between log steps: step time, tokens/s, TFLOP/s, MFU."""

  def __init__(self, tokens_per_step: int, flops_per_token: float,
               peak: Optional[float], num_devices: int):
    self._tokens = tokens_per_step
    self._flops = flops_per_token * tokens_per_step
    self._peak = peak * num_devices if peak else None
    self.reset(0)

  def reset(self, step: int) -> None:
    self._step, self._time = step, time.perf_counter()

  def measure(self, step: int) -> dict:
    now = time.perf_counter()
    dt = (now - self._time) / max(step - self._step, 1)
    self._step, self._time = step, now
    out = dict(step_time_s=dt, tokens_per_s=self._tokens / dt,
               tflops=self._flops / dt / 1e12)
    if self._peak:
      out["mfu"] = self._flops / dt / self._peak
    return out
