"""Decode methods by name: how each layer caches, prefills and attends.

  method = methods.get_method("quest", token_budget=2048)
  method = method.calibrate(model, calib_tokens)   # DS channels, MoA spans

A method is a frozen dataclass (hashable: a jit-static value) registered
with `@register_method(name)`; its fields are its options. It answers, per
layer: `make_cache(...)` (an empty cache with `prefill` / `append`),
`prefill_mask(...)` (the BlockMask for the prompt) and
`attend(layer, q, cache, state) -> (out, state)` for one new token;
`state` carries what layers pass on within a step (TidalDecode's selected
positions). `sparsejax.inference.generate` drives them.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Type

import jax.numpy as jnp
import numpy as np

import sparsejax as sj
from sparsejax.inference import double_sparsity
from sparsejax.inference import lm_decode
from sparsejax.inference import moa
from sparsejax.inference import moa_profile
from sparsejax.inference import quest
from sparsejax.inference import tidal
from sparsejax.inference.paged_cache import PagedKVCache
from sparsejax.inference.paged_decode import paged_decode_attention

_METHODS: Dict[str, Type["DecodeMethod"]] = {}


def register_method(name: str):
  """Class decorator adding a DecodeMethod under `name`."""
  def wrap(cls):
    if name in _METHODS:
      raise ValueError(f"decode method {name!r} is already registered")
    cls.name = name
    _METHODS[name] = cls
    return cls
  return wrap


def method_names() -> list:
  return sorted(_METHODS)


def option_names(name: str) -> list:
  return [f.name for f in dataclasses.fields(_get_cls(name))]


def _get_cls(name):
  if name not in _METHODS:
    raise ValueError(f"unknown decode method {name!r}; valid: "
                     f"{', '.join(method_names())}")
  return _METHODS[name]


def get_method(name: str, **options) -> "DecodeMethod":
  """The method `name` with `options` (ValueError naming valid ones)."""
  cls = _get_cls(name)
  valid = option_names(name)
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(f"decode method {name!r} got unknown options {unknown};"
                     f" valid options: {valid}")
  return cls(**options)


@dataclasses.dataclass(frozen=True)
class DecodeMethod:
  """Dense decode over a paged cache; subclasses override what differs."""
  name = "base"
  page_size: int = 16
  impl: str = "auto"
  tuning: Any = None

  def __post_init__(self):
    minimum = {"page_size": 1, "token_budget": 1, "dense_layers": 0}
    for name, least in minimum.items():
      val = getattr(self, name, None)
      if val is not None and (not isinstance(val, (int, np.integer)) or
                              val < least):
        raise ValueError(f"{self.name} option {name} must be an int >= "
                         f"{least}, got {val!r}")

  # -- calibration (default: nothing to learn) --------------------------------

  def calibrate(self, model, tokens, loss_mask=None) -> "DecodeMethod":
    """Learns what the method needs from int tokens [B, L]; loss_mask
    (float [B, L - 1] over the targets tokens[:, 1:]) marks the tokens whose
    loss matters, for methods that profile a loss (MoA)."""
    del model, tokens, loss_mask
    return self

  # -- per layer ----------------------------------------------------------------

  def is_dense(self, layer: int) -> bool:
    return layer < getattr(self, "dense_layers", 1 << 30)

  def make_cache(self, layer, batch, max_len, num_kv_heads, head_dim, dtype):
    del layer
    return PagedKVCache.create(batch, max_len, num_kv_heads, head_dim, dtype,
                               page_size=self.page_size)

  def prefill_mask(self, layer, seq_len, num_heads, num_kv_heads, max_len,
                   block_size=128):
    del layer, num_heads, num_kv_heads, max_len
    return sj.masks.causal(seq_len, block_size=lm_decode.prefill_block(seq_len,
                                                             block_size))

  def init_state(self):
    return None

  def attend(self, layer, q, cache, state):
    del layer
    return self._dense(q, cache), state

  def _dense(self, q, cache):
    return paged_decode_attention(q, cache.k_pages, cache.v_pages,
                                  cache.dense_lists(), impl=self.impl,
                                  tuning=self.tuning)

  @property
  def kernel_kw(self):
    return dict(impl=self.impl, tuning=self.tuning)


@register_method("dense")
@dataclasses.dataclass(frozen=True)
class Dense(DecodeMethod):
  """Every cached token, through the split-KV paged kernel."""


@register_method("quest")
@dataclasses.dataclass(frozen=True)
class Quest(DecodeMethod):
  """Top pages by the min/max upper bound (quest.py)."""
  token_budget: int = 2048
  dense_layers: int = 2
  per_head: bool = False

  def make_cache(self, layer, batch, max_len, num_kv_heads, head_dim, dtype):
    return PagedKVCache.create(batch, max_len, num_kv_heads, head_dim, dtype,
                               page_size=self.page_size,
                               page_bounds=not self.is_dense(layer))

  def attend(self, layer, q, cache, state):
    if self.is_dense(layer):
      return self._dense(q, cache), state
    return quest.quest_decode(q, cache, token_budget=self.token_budget,
                              per_head=self.per_head, **self.kernel_kw), state


@register_method("double_sparsity")
@dataclasses.dataclass(frozen=True)
class DoubleSparsity(DecodeMethod):
  """Label-cache scores, token top-k (double_sparsity.py). token_fraction
  (default 1/16) sets each sequence's budget, capped by token_budget (None:
  token_fraction of max_len); channel_fraction (1/16) the label channels.
  `channels`: per sparse layer int [Hkv, r], from `calibrate`."""
  token_fraction: Optional[float] = 1 / 16
  token_budget: Optional[int] = None
  channel_fraction: float = 1 / 16
  dense_layers: int = 2
  per_head: bool = False
  channels: Optional[Tuple[Any, ...]] = None

  def calibrate(self, model, tokens, loss_mask=None):
    del loss_mask  # the channel statistic is over all tokens, as DS's own
    if self.channels is not None:
      return self
    qk = lm_decode.capture_qk(model, jnp.asarray(tokens))
    d = qk[0][0].shape[-1]
    r = max(1, round(d * self.channel_fraction))
    chans = tuple(
        tuple(map(tuple, np.asarray(double_sparsity.calibrate_channels(
            q, k, r)).tolist())) for q, k in qk)
    return dataclasses.replace(self, channels=chans)

  def _channels(self, layer):
    if self.channels is None:
      raise ValueError("double_sparsity needs calibrated channels: call "
                       "method.calibrate(model, tokens) or pass channels=")
    return np.asarray(self.channels[layer], np.int32)

  def make_cache(self, layer, batch, max_len, num_kv_heads, head_dim, dtype):
    ch = None if self.is_dense(layer) else self._channels(layer)
    return PagedKVCache.create(batch, max_len, num_kv_heads, head_dim, dtype,
                               page_size=self.page_size, channels=ch)

  def attend(self, layer, q, cache, state):
    if self.is_dense(layer):
      return self._dense(q, cache), state
    budget = self.token_budget or math.ceil(cache.max_len *
                                            (self.token_fraction or 1.0))
    return double_sparsity.ds_decode(
        q, cache, token_budget=budget, token_fraction=self.token_fraction,
        per_head=self.per_head, **self.kernel_kw), state


@register_method("tidal")
@dataclasses.dataclass(frozen=True)
class Tidal(DecodeMethod):
  """Selection layers pick top-k tokens; the other sparse layers reuse
  them (tidal.py). selection_layers None: (dense_layers,)."""
  token_budget: int = 2048
  dense_layers: int = 2
  selection_layers: Optional[Tuple[int, ...]] = None
  per_head: bool = False

  def role(self, layer):
    sel = self.selection_layers or (self.dense_layers,)
    return ("dense" if layer < self.dense_layers else
            "select" if layer in sel else "reuse")

  def attend(self, layer, q, cache, state):
    role = self.role(layer)
    if role == "dense":
      return self._dense(q, cache), state
    if role == "select":
      out, pos, counts = tidal.tidal_select(
          q, cache, token_budget=self.token_budget, per_head=self.per_head,
          **self.kernel_kw)
      return out, (pos, counts)
    if state is None:
      raise ValueError(f"tidal layer {layer} reuses a selection, but no "
                       f"selection layer ran before it")
    return tidal.tidal_reuse(q, cache, *state, **self.kernel_kw), state


@register_method("moa")
@dataclasses.dataclass(frozen=True)
class MoA(DecodeMethod):
  """Per-head elastic spans (moa.py). `spans`: one MoASpans per layer, or
  None to profile them in `calibrate` under `density_budget` (at N =
  max_len of the calibration's target, `target_len`). response_mask: the
  profile's loss is on calibrate's loss_mask tokens when one is given (MoA's
  `--response_mask`); False: on every token."""
  spans: Optional[Tuple[moa.MoASpans, ...]] = None
  density_budget: float = 0.25
  target_len: Optional[int] = None
  block: int = 64
  min_span: int = 128
  sink_size: int = 64
  response_mask: bool = True

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.response_mask, bool):
      raise TypeError(f"moa option response_mask must be a bool, got "
                      f"{self.response_mask!r}")

  def calibrate(self, model, tokens, loss_mask=None):
    if self.spans is not None:
      return self
    if not self.response_mask:
      loss_mask = None
    toks = np.asarray(tokens)
    template = moa.MoASpans((0.0,), (1.0,), self.min_span, self.block,
                            self.sink_size)
    # Two profiling lengths, as MoA profiles at several (2K / 4K / 8K). With
    # a loss mask (answers at the end) the short one is the suffix, which
    # keeps the answers; without, the prefix.
    n = toks.shape[1] - 1
    half = max(8, n // 2)
    calib, masks = {n: toks}, {}
    if loss_mask is None:
      calib[half] = toks[:, :half + 1]
    else:
      mask = np.asarray(loss_mask, np.float32)
      calib[half] = toks[:, -(half + 1):]
      masks = {n: mask, half: mask[:, -half:]}
    spans, _ = moa_profile.profile_spans(
        model, calib, target_len=self.target_len or n,
        density_budget=self.density_budget, template=template,
        loss_masks=masks)
    return dataclasses.replace(self, spans=tuple(spans))

  def _spans(self, layer):
    if self.spans is None:
      raise ValueError("moa needs spans: call method.calibrate(model, "
                       "tokens) or pass spans=")
    return self.spans[layer]

  def make_cache(self, layer, batch, max_len, num_kv_heads, head_dim, dtype):
    return moa.MoAKVCache.create(batch, max_len, num_kv_heads, head_dim,
                                 dtype, self._spans(layer), block=self.block)

  def prefill_mask(self, layer, seq_len, num_heads, num_kv_heads, max_len,
                   block_size=128):
    del num_kv_heads
    return moa.moa_mask(seq_len, num_heads, self._spans(layer),
                        context_len=max_len,
                        block_size=lm_decode.prefill_block(seq_len, block_size))

  def attend(self, layer, q, cache, state):
    del layer
    return moa.moa_decode(q, cache, **self.kernel_kw), state


def spans_from_plan(num_layers: int, alphas: Sequence[float],
                    betas: Sequence[float], **kw) -> Tuple[moa.MoASpans, ...]:
  """The same per-kv-head plan at every layer (tests, benchmarks)."""
  return tuple(moa.MoASpans(tuple(alphas), tuple(betas), **kw)
               for _ in range(num_layers))
