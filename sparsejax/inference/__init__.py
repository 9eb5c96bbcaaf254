"""Inference: KV caches, decode attention and decode-time selection.

  S2         a per-head compacted cache for S2-Attention (S2KVCache)
  paged      a paged KV cache (PagedKVCache) and one split-KV decode op over
             visit lists (paged_decode_attention), every path below uses it
  selection  Quest (pages), Double Sparsity (label cache), TidalDecode
             (position-persistent tokens), MoA (per-head elastic spans)
  generate   the NNX LM with a decode method chosen by name (Generator;
             the module `sparsejax.inference.generate` also has generate())
"""

from sparsejax.inference.double_sparsity import (calibrate_channels,
                                                 ds_decode, ds_reference)
from sparsejax.inference.generate import Generator
from sparsejax.inference.implementations import DECODE
from sparsejax.inference.methods import (DecodeMethod, get_method,
                                         method_names, register_method)
from sparsejax.inference.moa import (MoAKVCache, MoASpans, moa_decode,
                                     moa_mask, moa_reference)
from sparsejax.inference.moa_profile import profile_spans
from sparsejax.inference.paged_cache import (PagedKVCache, VisitList,
                                             token_view)
from sparsejax.inference.paged_decode import paged_decode_attention
from sparsejax.inference.pattern import S2Pattern, phi3_small
from sparsejax.inference.quest import quest_decode, quest_reference
from sparsejax.inference.s2_cache import (S2KVCache, SlotView,
                                          capacity_kv_bytes, dense_kv_bytes)
from sparsejax.inference.s2_decode import s2_decode_attention
from sparsejax.inference.tidal import (tidal_reference, tidal_reuse,
                                       tidal_select)

__all__ = [
    "S2Pattern", "phi3_small", "S2KVCache", "SlotView", "capacity_kv_bytes",
    "dense_kv_bytes", "s2_decode_attention",
    "PagedKVCache", "VisitList", "token_view", "paged_decode_attention",
    "DECODE",
    "quest_decode", "quest_reference",
    "calibrate_channels", "ds_decode", "ds_reference",
    "tidal_select", "tidal_reuse", "tidal_reference",
    "MoASpans", "MoAKVCache", "moa_mask", "moa_decode", "moa_reference",
    "profile_spans",
    "DecodeMethod", "register_method", "get_method", "method_names",
    "Generator",
]
