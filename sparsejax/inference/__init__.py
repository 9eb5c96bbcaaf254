"""Inference for S2-Attention: a per-head compacted KV cache and decode."""

from sparsejax.inference.pattern import S2Pattern, phi3_small
from sparsejax.inference.s2_cache import (S2KVCache, SlotView,
                                          capacity_kv_bytes, dense_kv_bytes)
from sparsejax.inference.s2_decode import s2_decode_attention

__all__ = ["S2Pattern", "phi3_small", "S2KVCache", "SlotView",
           "capacity_kv_bytes", "dense_kv_bytes", "s2_decode_attention"]
