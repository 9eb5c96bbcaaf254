"""training.aot: background compiles, and the GIL switch interval they set."""

import sys
import threading

import jax
import jax.numpy as jnp
import pytest

from sparsejax.training import aot


def test_switch_interval_is_short_only_while_lowering():
  before = sys.getswitchinterval()
  started, release = threading.Event(), threading.Event()

  def traced(x):  # runs on the lowering thread, while it traces
    started.set()
    release.wait(30)
    return x * 2

  compiler = aot.Compiler(switch_interval=1e-4)
  compiler.submit("f", jax.jit(traced), jax.ShapeDtypeStruct((3,), jnp.float32))
  assert started.wait(30)
  assert sys.getswitchinterval() == pytest.approx(1e-4)
  release.set()
  out = compiler.get("f")(jnp.arange(3.0))
  compiler.close()
  assert sys.getswitchinterval() == pytest.approx(before)
  assert out.tolist() == [0.0, 2.0, 4.0]


def test_failed_lowering_restores_it_and_raises_at_get():
  before = sys.getswitchinterval()
  compiler = aot.Compiler()

  def broken(x):
    raise RuntimeError("no lowering")

  compiler.submit("g", jax.jit(broken), jax.ShapeDtypeStruct((3,), jnp.float32))
  with pytest.raises(RuntimeError, match="no lowering"):
    compiler.get("g")
  compiler.close()
  assert sys.getswitchinterval() == pytest.approx(before)


def test_switch_interval_is_validated():
  with pytest.raises(ValueError, match="switch_interval"):
    aot.Compiler(switch_interval=0.0)


def test_submit_after_close_raises_and_leaves_it():
  before = sys.getswitchinterval()
  compiler = aot.Compiler()
  compiler.close()
  with pytest.raises(RuntimeError):
    compiler.submit("h", jax.jit(lambda x: x),
                    jax.ShapeDtypeStruct((3,), jnp.float32))
  assert sys.getswitchinterval() == pytest.approx(before)


def test_work_clock_leaves_out_the_waits_in_get():
  release = threading.Event()

  def traced(x):
    release.wait(30)
    return x + 1

  compiler = aot.Compiler()
  clock = aot.WorkClock(compiler)
  compiler.submit("w", jax.jit(traced), jax.ShapeDtypeStruct((3,), jnp.float32))
  threading.Timer(0.3, release.set).start()
  compiler.get("w")  # blocks until the lowering is released
  compiler.close()
  assert clock.waited >= 0.25
  assert clock.seconds() == pytest.approx(clock.wall - clock.waited, abs=0.05)
  assert clock.seconds() < 0.25
