"""sparsejax: sparse and efficient attention for JAX, with Pallas kernels.

Families (each a subpackage with a jnp reference, an `xla` path and Pallas
kernels in pallas_kernels/, behind one `impl=` argument):
  block_sparse  the core: BlockMask, masks, score mods, sj.attention
  vision        MaxViT block/grid, neighborhood attention, BiFormer routing
  linear        Lightning Attention-2 and its decode step
  lowrank       Performer features, Scatterbrain sparse + low-rank
  learned       SeerAttention gates, Routing Transformer, MInference -> BlockMasks
  inference     KV caches, decode, decode-time selection
"""

from sparsejax.block_sparse import mask_fns
from sparsejax.block_sparse import masks
from sparsejax.block_sparse import score_mods
from sparsejax.block_sparse.api import attention
from sparsejax.block_sparse.dot_product_attention import dot_product_attention
from sparsejax.block_sparse.block_mask import BlockMask
from sparsejax.block_sparse.reference import attention_reference
from sparsejax.registry import target_platform
from sparsejax import inference
from sparsejax import learned
from sparsejax import linear
from sparsejax import lowrank
from sparsejax import vision

__all__ = ["attention", "attention_reference", "BlockMask", "masks",
           "mask_fns", "score_mods", "dot_product_attention",
           "target_platform", "inference", "learned", "linear", "lowrank",
           "vision"]
__version__ = "0.1.0"
