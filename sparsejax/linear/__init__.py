"""Linear attention: Lightning Attention-2 (chunked, with decay) and decode.

  o = sj.linear.lightning_attention(q, k, v, sj.linear.alibi_slopes(heads))
  o, state = sj.linear.lightning_attention(..., return_final_state=True)
  o1, state = sj.linear.lightning_decode(q1, k1, v1, state, slopes)

`lightning_recurrence` and `lightning_quadratic` are the float64-capable
references; `generate` holds the hybrid LM's prefill/decode (recurrent state
for the lightning layers, a KV cache for the softmax ones).
"""

from sparsejax.linear.api import lightning_attention, lightning_decode
from sparsejax.linear.reference import (decode_reference, lightning_quadratic,
                                        lightning_recurrence)
from sparsejax.linear.slopes import (DECAY_RULES, alibi_slopes, decay_slopes,
                                     fla_lightning_slopes, minimax_slopes)
from sparsejax.linear.implementations import DECODE_REGISTRY, REGISTRY

__all__ = ["lightning_attention", "lightning_decode", "lightning_recurrence",
           "lightning_quadratic", "decode_reference", "alibi_slopes",
           "minimax_slopes", "fla_lightning_slopes", "decay_slopes",
           "DECAY_RULES", "REGISTRY", "DECODE_REGISTRY"]
