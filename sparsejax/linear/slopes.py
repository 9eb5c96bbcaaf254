"""Per-head decay slopes: ALiBi, MiniMax's per-layer rule and fla's rule.

`lightning_attention` takes slopes s_h >= 0 and decays by lam_h = exp(-s_h)
per token. The recipes below are the ones the literature ships; they are
*different* decays, so a checkpoint trained with one must be run with it:

* `alibi_slopes(H)`: s_h = 2^(-8 (h+1) / H) (ALiBi, Press et al.), with the
  ALiBi interleave for H not a power of two. OpenNLPLab's
  `_build_slope_tensor`.
* `minimax_slopes(H, l, L)`: alibi_slopes(H) * (1 - l / (L - 1) + 1e-5), the
  per-layer scaling of TransNormerLLM / MiniMax-Text-01 / HF
  `MiniMaxLightningAttention` (layer 0 decays fastest, the last layer almost
  not at all).
* `fla_lightning_slopes(H, l, L)`: s_h = (8 / H) (1 - l / L) h, which is what
  fla's `chunk_lightning_attn(q, k, v, layer_idx, num_layers)` passes to
  `chunk_simple_gla` as g_gamma = -s. Head 0 never decays, the decay is linear
  in the head index (not geometric) and reaches e^-8 per token for the last
  head of layer 0; fla also defaults to scale 1/sqrt(d) where MiniMax uses 1.
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import numpy as np


def _alibi_pow2(n: int) -> list[float]:
  start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))  # = 2^(-8/n)
  return [start * start ** i for i in range(n)]


def _alibi(n: int) -> list[float]:
  if math.log2(n).is_integer():
    return _alibi_pow2(n)
  closest = 2 ** math.floor(math.log2(n))
  return _alibi_pow2(closest) + _alibi(2 * closest)[0::2][:n - closest]


def _check_heads(num_heads):
  if not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
    raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")


def _check_layer(layer, num_layers):
  if not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
    raise ValueError(f"num_layers must be a positive int, got "
                     f"{num_layers!r}")
  if not isinstance(layer, (int, np.integer)) or not 0 <= layer < num_layers:
    raise ValueError(f"layer must be an int in [0, {num_layers}), got "
                     f"{layer!r}")


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi slopes 2^(-8 (h+1) / H), float32 [num_heads] (all in (0, 1))."""
  _check_heads(num_heads)
  return np.asarray(_alibi(int(num_heads)), np.float32)


def minimax_slopes(num_heads: int, layer: int, num_layers: int
                   ) -> np.ndarray:
  """MiniMax-Text-01 / TransNormerLLM: ALiBi * (1 - l/(L-1) + 1e-5).

  A one-layer model (L = 1) uses the factor 1 + 1e-5 (the formula's l/(L-1)
  is 0/0 there).
  """
  _check_heads(num_heads)
  _check_layer(layer, num_layers)
  frac = layer / (num_layers - 1) if num_layers > 1 else 0.0
  return (alibi_slopes(num_heads) * (1.0 - frac + 1e-5)).astype(np.float32)


def fla_lightning_slopes(num_heads: int, layer: int, num_layers: int
                         ) -> np.ndarray:
  """fla `chunk_lightning_attn`'s decay: (8 / H) (1 - l / L) h, h = 0..H-1."""
  _check_heads(num_heads)
  _check_layer(layer, num_layers)
  h = np.arange(num_heads, dtype=np.float64)
  return (8.0 / num_heads * (1.0 - layer / num_layers) * h).astype(
      np.float32)


# name -> (num_heads, layer, num_layers) -> slopes; the layers' `decay` option.
DECAY_RULES: Dict[str, Callable[[int, int, int], np.ndarray]] = {
    "minimax": minimax_slopes,
    "fla": fla_lightning_slopes,
    "alibi": lambda h, l, n: alibi_slopes(h),
    "none": lambda h, l, n: np.zeros((h,), np.float32),
}


def decay_slopes(rule: str, num_heads: int, layer: int, num_layers: int
                 ) -> np.ndarray:
  """Slopes of a named rule (see DECAY_RULES)."""
  if rule not in DECAY_RULES:
    raise ValueError(f"decay must be one of {sorted(DECAY_RULES)}, got "
                     f"{rule!r}")
  return DECAY_RULES[rule](num_heads, layer, num_layers)
