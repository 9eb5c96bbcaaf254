"""Block-sparse softmax attention: the core every other family builds on.

Layered as splash attention is: element mask functions (`mask_fns`) and
score mods (`score_mods`) -> block metadata (`block_mask.BlockMask`, built by
`masks`) -> the reference (`reference`), the blockwise jnp path (`xla`) and
the Pallas kernels in `pallas_kernels/`, all behind `api.attention`.
"""

from sparsejax.block_sparse import mask_fns
from sparsejax.block_sparse import masks
from sparsejax.block_sparse import score_mods
from sparsejax.block_sparse import segments
from sparsejax.block_sparse.api import attention
from sparsejax.block_sparse.dot_product_attention import dot_product_attention
from sparsejax.block_sparse.block_mask import BlockMask
from sparsejax.block_sparse.implementations import REGISTRY
from sparsejax.block_sparse.reference import attention_reference

__all__ = ["attention", "attention_reference", "BlockMask", "masks",
           "mask_fns", "score_mods", "segments", "dot_product_attention",
           "REGISTRY"]
