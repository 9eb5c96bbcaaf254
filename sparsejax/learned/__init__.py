"""Learned and dynamic sparsity: SeerAttention, Routing Transformer, MInference.

* SeerAttention: `AttnGate` scores (q block, kv block) pairs from pooled
  q/k; `select_blocks` (threshold or top-k by density), `gate_mask` (the
  selection's traced BlockMask, built from the top-k lists) and
  `gate_block_mask` (one from a kept-block array); `block_attention_probs`
  is the distillation target and `gate_kl_loss` the loss.
* Routing Transformer: `cluster_members` (k-means routing, equal-size
  clusters), `routing_attention` on the core, `kmeans_ema_update`,
  `commitment_loss`.
* MInference: `AShape`, `VerticalSlash`, `BlockSparse` patterns,
  `minference_mask` (from `head_lists`), and the offline `search_patterns`.
* `block_lists`: causal prefill masks straight from kept-block lists (no
  per-element mask evaluation, no [nq, nk] compressions).

The NNX layers are in `sparsejax.nn.learned_layers` (attention variants
`seer`, `routing_transformer`, `minference`).
"""

from sparsejax.learned import block_lists
from sparsejax.learned.block_probs import block_attention_probs
from sparsejax.learned.gate import AttnGate
from sparsejax.learned.gate import causal_density
from sparsejax.learned.gate import density_to_topk
from sparsejax.learned.gate import gate_block_mask
from sparsejax.learned.gate import gate_kl_loss
from sparsejax.learned.gate import gate_mask
from sparsejax.learned.gate import pool_blocks
from sparsejax.learned.gate import select_blocks
from sparsejax.learned.gate import select_lists
from sparsejax.learned.implementations import PROBS_REGISTRY
from sparsejax.learned.minference import AShape
from sparsejax.learned.minference import BlockSparse
from sparsejax.learned.minference import Dense
from sparsejax.learned.minference import VerticalSlash
from sparsejax.learned.minference import head_blocks
from sparsejax.learned.minference import head_lists
from sparsejax.learned.minference import minference_mask
from sparsejax.learned.minference import parse_pattern
from sparsejax.learned.minference import search_patterns
from sparsejax.learned.minference import vertical_slash_scores
from sparsejax.learned.reference import block_attention_probs_reference
from sparsejax.learned.reference import masked_attention_reference
from sparsejax.learned.reference import routing_attention_reference
from sparsejax.learned.routing import cluster_mask
from sparsejax.learned.routing import cluster_members
from sparsejax.learned.routing import commitment_loss
from sparsejax.learned.routing import kmeans_ema_update
from sparsejax.learned.routing import members_to_bool
from sparsejax.learned.routing import routing_attention
from sparsejax.learned.routing import routing_norm

__all__ = [
    "block_attention_probs", "block_attention_probs_reference",
    "PROBS_REGISTRY", "AttnGate", "causal_density", "density_to_topk",
    "gate_block_mask", "gate_kl_loss", "gate_mask", "pool_blocks",
    "select_blocks", "select_lists", "block_lists", "AShape", "BlockSparse",
    "Dense", "VerticalSlash", "head_blocks", "head_lists",
    "minference_mask", "parse_pattern", "search_patterns",
    "vertical_slash_scores", "masked_attention_reference",
    "routing_attention_reference", "cluster_mask", "cluster_members",
    "commitment_loss", "kmeans_ema_update", "members_to_bool",
    "routing_attention", "routing_norm",
]
