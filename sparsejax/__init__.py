"""sparsejax: sparse and efficient attention for JAX, with Pallas kernels."""

from sparsejax import masks
from sparsejax import mask_fns
from sparsejax.api import attention
from sparsejax.block_mask import BlockMask
from sparsejax.reference import attention_reference
from sparsejax import registered_implementations as _registered  # noqa: F401

__all__ = ["attention", "attention_reference", "BlockMask", "masks",
           "mask_fns"]
__version__ = "0.1.0"
