"""MoA's profiling step: choose each head's elastic span from calibration data.

MoA (thu-nics/MoA) scores every attention entry by its influence on the loss,
  E_ij = -A_ij (dL/dA_ij - sum_n A_in dL/dA_in) / (1 - A_ij),
the first-order loss change when entry (i, j) is masked out and the row is
renormalised, measured on calibration sequences (the model's own answers).
A candidate span (alpha, beta) of a head loses the influence of the entries
it does not cover; profiling sums that loss at several calibration lengths.
MoA then solves a multi-objective MILP (Gurobi) under a density bound; here
each (layer, kv head) picks one candidate by a Lagrangian relaxation of the
same budgeted problem (minimise the summed loss subject to the mean density
at the target length <= budget): bisection on the multiplier, one argmin per
head (exact for the relaxation, no solver needed).
"""

from __future__ import annotations

import itertools
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.inference import lm_decode
from sparsejax.inference.moa import MoASpans, visible_pairs

# MoA's search space (vicuna-7b plan: alpha in {-1024, 0, 1024} at 2K-12K
# profiles, beta in 0.125..1), as fractions of the profiling length so that
# small models and short calibration runs use it too.
DEFAULT_ALPHAS = (-0.125, 0.0, 0.125)
DEFAULT_BETAS = (0.0625, 0.125, 0.25, 0.5, 0.75, 1.0)


def attention_influence(a, da):
  """E = -A (dA - sum_n A dA) / (1 - A), rows over the last axis (f32).
  A row's only key (A = 1) gets 0: masking it empties the row."""
  a = a.astype(jnp.float32)
  da = da.astype(jnp.float32)
  centred = da - (a * da).sum(-1, keepdims=True)
  denom = jnp.where(a < 1.0 - 1e-6, 1.0 - a, 1.0)
  return -a * centred / denom


def _check_loss_mask(loss_mask, tokens):
  if loss_mask is None:
    return None
  mask = np.asarray(loss_mask, np.float32)
  want = (tokens.shape[0], tokens.shape[1] - 1)
  if mask.shape != want:
    raise ValueError(f"loss_mask must be [batch, length - 1] = {list(want)} "
                     f"(one weight per target tokens[:, 1:]), got "
                     f"{list(mask.shape)}")
  if not np.all(np.isfinite(mask)) or mask.min() < 0 or mask.sum() <= 0:
    raise ValueError("loss_mask must be finite, >= 0 and not all zero")
  return jnp.asarray(mask)


def layer_influence(model, tokens, loss_mask=None) -> List[np.ndarray]:
  """Per layer, influence summed over batch and each kv head's q heads:
  float32 [Hkv, L, L] (causal; entry (i, j): query i, key j).

  loss_mask: float [B, L] over the targets tokens[:, 1:] (None: all). MoA
  profiles with the loss on the model's answers only (`--response_mask`);
  on retrieval data the filler's loss would otherwise drown the answer's."""
  lm_decode.check_model(model)
  n_layers, h, hkv, _ = lm_decode.dims(model)
  b, l = tokens.shape
  mask = _check_loss_mask(loss_mask, tokens)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  zeros = [jnp.zeros((b, h, l - 1, l - 1), jnp.float32)
           for _ in range(n_layers)]

  def loss_fn(deltas):
    probs = {}
    x = lm_decode.forward(model, inputs,
                          lm_decode.probs_attend(deltas, probs))
    lp = jax.nn.log_softmax(lm_decode.logits(model, x), -1)
    nll = -jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]
    nll = nll.mean() if mask is None else (nll * mask).sum() / mask.sum()
    return nll, probs

  grads, probs = jax.jit(jax.grad(loss_fn, has_aux=True))(zeros)
  out = []
  for i in range(n_layers):
    e = attention_influence(probs[i], grads[i])  # [B, H, L, L]
    e = jnp.tril(e).sum(0).reshape(hkv, h // hkv, l - 1, l - 1).sum(1)
    out.append(np.asarray(e))
  return out


def _covered(sink: int, window: int, n: int) -> np.ndarray:
  q = np.arange(n)[:, None]
  kv = np.arange(n)[None]
  return (kv <= q) & ((kv < sink) | (q - kv < window))


def candidate_losses(influence: Sequence[np.ndarray], candidates,
                     template: MoASpans, alpha_scale: float) -> np.ndarray:
  """Lost influence [layers, Hkv, C] of each candidate (alpha, beta).

  influence: per layer [Hkv, L, L] at one calibration length L; a
  candidate's span is alpha * alpha_scale + beta * L tokens."""
  n = influence[0].shape[-1]
  out = np.zeros((len(influence), influence[0].shape[0], len(candidates)))
  for c, (a, beta) in enumerate(candidates):
    spans = MoASpans((a * alpha_scale,), (beta,), template.min_span,
                     template.round_to, template.sink_size)
    (sink,), (window,) = spans.spans(n)
    dropped = ~_covered(sink, window, n)
    for i, e in enumerate(influence):
      out[i, :, c] = (e * dropped[None]).sum((1, 2))
  return out


def choose_spans(losses: np.ndarray, candidates, *, target_len: int,
                 density_budget: float, template: MoASpans,
                 alpha_scale: float) -> Tuple[List[MoASpans], dict]:
  """One candidate per (layer, kv head), mean density <= budget at
  target_len, minimising the summed loss (Lagrangian bisection)."""
  dens = np.array([
      MoASpans((a * alpha_scale,), (beta,), template.min_span,
               template.round_to, template.sink_size).density(target_len)
      for a, beta in candidates])
  def pick(lam):
    return np.argmin(losses + lam * dens[None, None], axis=-1)
  if dens[pick(0.0)].mean() <= density_budget:
    lam = 0.0
  else:
    lo, hi = 0.0, 1.0
    while dens[pick(hi)].mean() > density_budget and hi < 1e12:
      hi *= 4
    for _ in range(60):
      mid = (lo + hi) / 2
      lo, hi = (mid, hi) if dens[pick(mid)].mean() > density_budget else (
          lo, mid)
    lam = hi
  choice = pick(lam)
  if dens[choice].mean() > density_budget:
    logging.warning("MoA profiling: the shortest candidate spans have mean "
                    "density %.3f > the budget %.3f at length %d",
                    dens[choice].mean(), density_budget, target_len)
  plans = [MoASpans(tuple(candidates[c][0] * alpha_scale for c in row),
                    tuple(candidates[c][1] for c in row), template.min_span,
                    template.round_to, template.sink_size)
           for row in choice]
  info = dict(density=float(dens[choice].mean()), multiplier=float(lam),
              met_budget=bool(dens[choice].mean() <= density_budget),
              lost_influence=float(np.take_along_axis(
                  losses, choice[..., None], -1).sum()),
              choice=choice.tolist())
  return plans, info


def profile_spans(model, calib_tokens: Dict[int, np.ndarray], *,
                  target_len: int, density_budget: float,
                  alphas: Sequence[float] = DEFAULT_ALPHAS,
                  betas: Sequence[float] = DEFAULT_BETAS,
                  template: Optional[MoASpans] = None,
                  loss_masks: Optional[Dict[int, np.ndarray]] = None):
  """Per-layer spans for `model` from calibration token batches
  {length: int32 [B, length + 1]} (the profiling lengths), with the loss on
  loss_masks[length] ([B, length], see `layer_influence`) where given.

  Returns (list of MoASpans per layer, info dict). Alphas are fractions of
  the longest profiling length (MoA's +-1024 tokens at 8K profiles).
  """
  template = template or MoASpans((0.0,), (1.0,))
  candidates = list(itertools.product(alphas, betas))
  total = None
  alpha_scale = float(max(calib_tokens))  # alpha: tokens, not a fraction
  loss_masks = loss_masks or {}
  for length, toks in sorted(calib_tokens.items()):
    infl = layer_influence(model, jnp.asarray(toks), loss_masks.get(length))
    lost = candidate_losses(infl, candidates, template, alpha_scale)
    total = lost if total is None else total + lost
  return choose_spans(total, candidates, target_len=target_len,
                      density_budget=density_budget, template=template,
                      alpha_scale=alpha_scale)


def density_of(spans: Sequence[MoASpans], n: int) -> float:
  """Mean density over layers and kv heads at length n."""
  return float(np.mean([s.density(n) for s in spans]))


__all__ = ["attention_influence", "layer_influence", "candidate_losses",
           "choose_spans", "profile_spans", "density_of", "visible_pairs"]
