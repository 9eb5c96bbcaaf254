"""What every Lightning kernel shares: the split plan, the boundary-state
scans in XLA, the slope gradient and the custom_vjp.

The kernels cut each sequence into `num_splits` splits of `split` tokens
(a multiple of the chunk), so that batch * heads * splits programs run at
once even for small batch * heads (the two-pass design):

  forward   1. per split r < NS-1, in parallel: its own state dS_r (the state
               at its last token, starting from zero)
            2. XLA: the state entering every split,
               S_in[s] = sum_{r<s} lam^((s-1-r) L) dS_r + lam^(s L) S0
            3. per split, in parallel: walk its chunks from S_in[s] writing o
               (and the final state, from the last split)
  backward  1. per split r > 0: its own gradient dG_r entering its first
               token from inside it (the state gradient at its start)
            2. XLA: the gradient entering each split at its last token,
               G_in[s] = sum_{r>s} lam^((r-1-s) L) dG_r + lam^(T-1-E_s) dS_T
            3. per split: dq walking forward from S_in[s] (saved by the
               forward), dk/dv walking backward from G_in[s] (and dS0, from
               the first split)

With one split (large batch * heads) steps 1-2 vanish: one forward kernel,
two backward kernels. Exponents are -slope * (non-negative count), masked
before exp.

Slope gradients follow from an identity: writing lam^(t-j) = e^(a t) e^(-a j)
(a = -slope; only in the derivation, never numerically),
  dL/da = sum_t (t - T + 1) (<q_t, dq_t> - <k_t, dk_t>) + T <S0, dS0>,
so they need only dq, dk and dS0 (the final-state term cancels). The two
position-weighted sums are ~40x larger than their difference at T ~ 1000
(they cancel), so the row dots must come from the kernels' f32 dq and dk:
with dq, dk rounded to bf16 first the result is off by 2-6%. Kernels that
can return the row dots <q_t, dq_t>, <k_t, dk_t> (f32, before rounding) do;
the others fall back to the rounded dq, dk.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static geometry and flags of one kernel call (hashable)."""
  seq_len: int       # T, the true length
  chunk: int         # C
  split: int         # L: tokens per split, a multiple of C
  num_splits: int    # NS: (NS - 1) * L < T <= NS * L
  scale: float
  has_initial_state: bool
  want_final_state: bool
  interpret: Any = False
  tuning: Any = None

  @property
  def padded_len(self) -> int:
    return self.num_splits * self.split

  @property
  def chunks_per_split(self) -> int:
    return self.split // self.chunk


def choose_splits(num_chunks: int, programs_per_split: int, *,
                  num_sms: int = 132, min_chunks_per_split: int = 8,
                  overhead_chunks: float = 4.0) -> int:
  """The number of splits minimising a simple wave model of the forward.

  Each split costs a program per (batch, head, value tile) in the output
  pass (its chunks plus `overhead_chunks` of boundary-state traffic) and in
  the state pass (half the bytes per chunk); programs run in waves of
  `num_sms`. Splits shorter than `min_chunks_per_split` chunks are not
  considered (their state traffic would dominate).
  """
  best, best_cost = 1, None
  for ns in range(1, num_chunks + 1):
    per = -(-num_chunks // ns)
    ns = -(-num_chunks // per)
    if ns > 1 and per < min_chunks_per_split:
      break
    waves = -(-ns * programs_per_split // num_sms)
    cost = waves * (per + (overhead_chunks if ns > 1 else 0.0))
    if ns > 1:
      state_waves = -(-(ns - 1) * programs_per_split // num_sms)
      cost += state_waves * (0.5 * per + overhead_chunks / 2)
    if best_cost is None or cost < best_cost - 1e-9:
      best, best_cost = ns, cost
  return best


def make_plan(seq_len: int, chunk: int, num_splits: int, *, scale,
              has_initial_state, want_final_state, interpret=False,
              tuning=None) -> Plan:
  num_chunks = -(-seq_len // chunk)
  if not 1 <= num_splits:
    raise ValueError(f"num_splits must be >= 1, got {num_splits}")
  per = -(-num_chunks // min(num_splits, num_chunks))
  return Plan(seq_len=seq_len, chunk=chunk, split=per * chunk,
              num_splits=-(-num_chunks // per), scale=float(scale),
              has_initial_state=has_initial_state,
              want_final_state=want_final_state, interpret=interpret,
              tuning=tuning)


def entering_states(local, slopes, s0, plan: Plan):
  """S_in [B, NS, H, d, e] f32 from the splits' own states dS_r.

  local: [B, NS-1, H, d, e] (splits 0..NS-2) or None when NS == 1.
  """
  ns, big_l = plan.num_splits, plan.split
  s = slopes.astype(jnp.float32)
  starts = jnp.arange(ns)
  out = None
  if ns > 1:
    r = jnp.arange(ns - 1)
    gap = (starts[:, None] - 1 - r[None, :]) * big_l  # [NS, NS-1]
    w = jnp.exp(jnp.where(r[None, :] < starts[:, None],
                          -s[:, None, None] * gap, -jnp.inf))
    out = jnp.einsum("hsr,brhde->bshde", w, local, precision=_HI)
  if plan.has_initial_state or out is None:
    w0 = jnp.exp(-s[:, None] * (starts * big_l))  # [H, NS]
    init = jnp.einsum("hs,bhde->bshde", w0, s0.astype(jnp.float32),
                      precision=_HI)
    out = init if out is None else out + init
  return out


def entering_grads(local, slopes, ds_final, plan: Plan):
  """G_in [B, NS, H, d, e] f32 from the splits' own start gradients dG_r.

  local: [B, NS-1, H, d, e] (splits 1..NS-1) or None when NS == 1;
  ds_final: the cotangent of the final state [B, H, d, e].
  """
  ns, big_l, t = plan.num_splits, plan.split, plan.seq_len
  s = slopes.astype(jnp.float32)
  split = jnp.arange(ns)
  ends = jnp.minimum((split + 1) * big_l, t) - 1
  w_t = jnp.exp(-s[:, None] * (t - 1 - ends))  # [H, NS]
  out = jnp.einsum("hs,bhde->bshde", w_t, ds_final.astype(jnp.float32),
                   precision=_HI)
  if ns > 1:
    r = jnp.arange(ns - 1)  # local[:, r] belongs to split r + 1
    gap = (r[None, :] - split[:, None]) * big_l
    w = jnp.exp(jnp.where(r[None, :] >= split[:, None],
                          -s[:, None, None] * gap, -jnp.inf))
    out = out + jnp.einsum("hsr,brhde->bshde", w, local, precision=_HI)
  return out


def slope_grad(q, k, dq, dk, s0, ds0, plan: Plan, rowdots=None):
  """dL/dslopes [H] from the identity in the module docstring.

  rowdots: None, or (u, w) with u[..., t] = <q_t, dq_t> and w[..., t] =
  <k_t, dk_t> in f32 from the kernel, each [NV, B, H, T'] (partial sums
  over NV value tiles; T' >= T, zero past T).
  """
  f32 = jnp.float32
  if rowdots is None:
    r = (jnp.einsum("bthd,bthd->bht", q.astype(f32), dq.astype(f32),
                    precision=_HI)
         - jnp.einsum("bthd,bthd->bht", k.astype(f32), dk.astype(f32),
                      precision=_HI))
  else:
    u, w = rowdots
    r = (u - w).sum(0)
  pos = jnp.arange(r.shape[-1], dtype=f32) - (plan.seq_len - 1)
  da = jnp.einsum("bht,t->h", r, pos, precision=_HI)
  if plan.has_initial_state:
    da = da + plan.seq_len * jnp.einsum("bhde,bhde->h", s0.astype(f32),
                                        ds0.astype(f32), precision=_HI)
  return -da


def make_vjp(forward: Callable, backward: Callable) -> Callable:
  """lightning(q, k, v, slopes, s0, plan) -> (o, final state or None).

  forward(q, k, v, slopes, s0, plan) -> (o, final or None, s_in) and
  backward(q, k, v, slopes, s0, s_in, do, ds_final, plan) -> (dq, dk, dv,
  ds0, rowdots), on the kernel's padded arrays (rowdots: see `slope_grad`);
  s_in (the states the backward's walks start from) is the only residual
  besides the inputs.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
  def lightning(q, k, v, slopes, s0, plan):
    o, final, _ = forward(q, k, v, slopes, s0, plan)
    return o, final

  def fwd(q, k, v, slopes, s0, plan):
    o, final, s_in = forward(q, k, v, slopes, s0, plan)
    return (o, final), (q, k, v, slopes, s0, s_in)

  def bwd(plan, res, cts):
    q, k, v, slopes, s0, s_in = res
    do, ds_final = cts
    if ds_final is None:
      ds_final = jnp.zeros(s0.shape, jnp.float32)
    dq, dk, dv, ds0, rowdots = backward(q, k, v, slopes, s0, s_in, do,
                                        ds_final, plan)
    dslopes = slope_grad(q, k, dq, dk, s0, ds0, plan,
                         rowdots).astype(slopes.dtype)
    return dq, dk, dv, dslopes, ds0.astype(s0.dtype)

  lightning.defvjp(fwd, bwd)
  return lightning


def pad_to(x, axis: int, size: int):
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)
