"""Attention variants by name, for the models' layers.

Two kinds of variant share one name space:

* Mask variants (`register`): softmax attention through `sj.attention` with a
  static `BlockMask`. The factory is called once per layer at model
  construction (outside `jit`) as
  `factory(seq_len, num_heads, num_kv_heads, *, causal, **options)` and
  returns a `sj.BlockMask`, or None for full bidirectional attention:

    @attention_registry.register("my_variant")
    def _my_variant(seq_len, num_heads, num_kv_heads, *, causal, width=4):
      ...

* Layer variants (`register_layer`): any token mixer that is not a masked
  softmax (linear attention, vision windows, learned gates, ...). The factory
  gets a `LayerSpec` and the options and returns an `nnx.Module` called as
  `layer(x [B, L, d_model], positions=None, segment_ids=None)`:

    @attention_registry.register_layer("my_mixer")
    def _my_mixer(spec: LayerSpec, *, decay=0.9):
      return MyMixer(spec.d_model, spec.num_heads, ..., rngs=spec.rngs)

Family packages register their variants when `sparsejax.nn` is imported.
"""

import dataclasses
import functools
import inspect
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np

import sparsejax as sj

_REGISTRY: dict[str, Callable[..., Any]] = {}
_LAYERS: dict[str, Callable[..., Any]] = {}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """What a layer factory knows about its layer (model-level settings)."""
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  seq_len: int
  causal: bool
  rngs: Any
  dtype: Any
  impl: str = "auto"
  soft_cap: Optional[float] = None
  use_rope: bool = True
  rope_theta: float = 10000.0
  grid: Optional[Tuple[int, int]] = None  # (height, width) of vision tokens
  layer_index: int = 0
  num_layers: int = 1


def _add(table, name, factory):
  if name in _REGISTRY or name in _LAYERS:
    raise ValueError(f"attention variant {name!r} is already registered")
  table[name] = factory
  return factory


def register(name: str):
  """Decorator adding a mask factory to the registry under `name`."""
  return lambda factory: _add(_REGISTRY, name, factory)


def register_layer(name: str):
  """Decorator adding a layer factory (LayerSpec, **options) -> nnx.Module."""
  return lambda factory: _add(_LAYERS, name, factory)


def names() -> list[str]:
  """Sorted names of the registered attention variants (both kinds)."""
  return sorted(set(_REGISTRY) | set(_LAYERS))


def is_layer_variant(name: str) -> bool:
  get(name)
  return name in _LAYERS


def get(name: str) -> Callable[..., Any]:
  """The factory for `name`; ValueError listing valid names if unknown."""
  if name in _LAYERS:
    return _LAYERS[name]
  if name not in _REGISTRY:
    raise ValueError(f"unknown attention variant {name!r}; valid names: "
                     f"{', '.join(names())}")
  return _REGISTRY[name]


def _check_options(name, factory, options, strict, fixed):
  params = inspect.signature(factory).parameters
  unknown = sorted(set(options) - set(params))
  if unknown and strict:
    valid = [p for p in params if p not in fixed]
    raise ValueError(f"attention variant {name!r} got unknown options "
                     f"{unknown}; valid options: {valid}")
  return {k: v for k, v in options.items() if k in params}


def build_layer(name: str, spec: LayerSpec, *, strict: bool = True,
                **options):
  """The nnx layer of a layer variant (see `register_layer`)."""
  factory = _LAYERS[name]
  return factory(spec, **_check_options(name, factory, options, strict,
                                        ("spec",)))


def _hashable(value):
  if isinstance(value, (list, tuple, np.ndarray)):
    return tuple(_hashable(v) for v in value)
  if isinstance(value, dict):
    return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
  return value


def build_mask(name: str, seq_len: int, num_heads: int, num_kv_heads: int, *,
               causal: bool, strict: bool = True, **options):
  """Builds the mask of variant `name` for one layer.

  Args:
    name: registered variant name.
    seq_len: query and key length.
    num_heads: query heads.
    num_kv_heads: key/value heads (GQA).
    causal: decoder (True) or encoder (False) attention.
    strict: if False, options the factory does not take are dropped (a dense
      layer inside an S2 schedule shares the S2 option block); if True they
      are an error.
    **options: per-variant options (block_size, window, ...).

  Returns:
    A `sj.BlockMask`, or None for full bidirectional attention.
  """
  get(name)  # unknown names list the valid ones
  factory = _REGISTRY.get(name)
  if factory is None:
    raise ValueError(f"attention variant {name!r} is a layer variant, not a "
                     f"mask variant: build it with build_layer")
  options = _check_options(name, factory, options, strict,
                           ("seq_len", "num_heads", "num_kv_heads", "causal"))
  options = {k: _hashable(v) for k, v in options.items()}
  return _cached(name, seq_len, num_heads, num_kv_heads, causal,
                 tuple(sorted(options.items())))


@functools.lru_cache(maxsize=64)
def _cached(name, seq_len, num_heads, num_kv_heads, causal, options):
  # Layers with equal settings share one build (masks are read-only data).
  return _REGISTRY[name](seq_len, num_heads, num_kv_heads, causal=causal,
                   **dict(options))


def layer_schedule(num_layers: int, name: str, *, dense_every_n: int = 0,
                   dense_first: int = 0, dense_last: int = 0,
                   layers: Optional[Sequence[str] | str] = None) -> list[str]:
  """Per-layer variant names for hybrid schedules.

  Args:
    num_layers: depth of the model.
    name: the variant of every layer not overridden.
    dense_every_n: if > 0, every n-th layer (n-1, 2n-1, ...) is "dense".
    dense_first: the first this many layers are "dense".
    dense_last: the last this many layers are "dense".
    layers: explicit per-layer names (a list or a comma-separated string);
      overrides everything else.

  Returns:
    A list of `num_layers` registered variant names.
  """
  if layers:
    out = [s.strip() for s in layers.split(",")] if isinstance(
        layers, str) else list(layers)
    if len(out) != num_layers:
      raise ValueError(f"attention.layers has {len(out)} entries, expected "
                       f"num_layers={num_layers}")
  else:
    out = [name] * num_layers
    for i in range(num_layers):
      if ((dense_every_n > 0 and i % dense_every_n == dense_every_n - 1)
          or i < dense_first or i >= num_layers - dense_last):
        out[i] = "dense"
  for n in out:
    get(n)  # validates every name up front
  return out


# --- built-in variants ------------------------------------------------------


@register("dense")
def _dense(seq_len, num_heads, num_kv_heads, *, causal, block_size=128):
  del num_heads, num_kv_heads
  if not causal:
    return None  # full bidirectional: no mask needed
  return sj.masks.causal(seq_len, block_size=min(block_size, seq_len))


@register("sliding_window")
def _sliding_window(seq_len, num_heads, num_kv_heads, *, causal, window=256,
                    block_size=128):
  del num_heads, num_kv_heads
  return sj.masks.sliding_window(seq_len, window, causal=causal,
                                 block_size=min(block_size, seq_len))


@register("s2")
def _s2(seq_len, num_heads, num_kv_heads, *, causal, block_size=64,
        local_blocks=16, vert_stride=8, homo_head=False, num_dense_heads=0,
        head_sliding_offset=0):
  return sj.masks.s2(seq_len, num_heads, block_size=block_size,
                     local_blocks=local_blocks, vert_stride=vert_stride,
                     num_kv_heads=num_kv_heads, homo_head=homo_head,
                     num_dense_heads=num_dense_heads,
                     head_sliding_offset=head_sliding_offset, causal=causal)


def _causal_fn(b, h, q_idx, kv_idx):
  del b, h
  return q_idx >= kv_idx


@register("block_sparse")
def _block_sparse(seq_len, num_heads, num_kv_heads, *, causal, pattern=None,
                  block_size=64):
  """A user pattern: bool [nq, nk] or [heads, nq, nk] of visible blocks."""
  del num_kv_heads
  if pattern is None:
    raise ValueError("block_sparse needs options.pattern: a bool [nq, nk] "
                     "or [heads, nq, nk] block pattern")
  blocks = np.asarray(pattern, dtype=bool)
  nb = -(-seq_len // block_size)
  if blocks.ndim == 2:
    blocks = blocks[None]
  if blocks.shape[1:] != (nb, nb) or blocks.shape[0] not in (1, num_heads):
    raise ValueError(f"block_sparse pattern must be [{nb}, {nb}] or "
                     f"[{num_heads}, {nb}, {nb}] for seq_len={seq_len}, "
                     f"block_size={block_size}; got {blocks.shape}")
  if causal:  # keep the lower block triangle; the diagonal needs q >= kv
    blocks = blocks & np.tril(np.ones((nb, nb), bool))
  return sj.masks.from_block_mask(
      blocks[None], block_size=block_size, q_len=seq_len, kv_len=seq_len,
      mask_fn=_causal_fn if causal else None)
