"""Learned and dynamic sparsity: SeerAttention, Routing Transformer, MInference."""

from sparsejax.learned.block_probs import block_attention_probs
from sparsejax.learned.implementations import PROBS_REGISTRY
from sparsejax.learned.reference import block_attention_probs_reference

__all__ = ["block_attention_probs", "block_attention_probs_reference",
           "PROBS_REGISTRY"]
