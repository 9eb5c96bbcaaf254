"""Vision attention: MaxViT block/grid, neighborhood, BiFormer routing.

  import sparsejax as sj
  out = sj.vision.block_attention(q, k, v, 7, rel_bias=table)  # [B,X,Y,H,D]
  out = sj.vision.grid_attention(q, k, v, 7, rel_bias=table2)
  out = sj.vision.neighborhood_attention(q, k, v, 7, dilation=2)
  out = sj.vision.routing_attention(q, k, v, num_regions=7, topk=4)

Token permutations (window-major, grid-major, NA tiles, region-major) are
in `sj.vision.permute`; the dense definitions in `sj.vision.reference`.
"""

from sparsejax.vision import natten
from sparsejax.vision import permute
from sparsejax.vision import reference
from sparsejax.vision import relative_bias
from sparsejax.vision import routing
from sparsejax.vision.api import block_attention
from sparsejax.vision.api import default_tile
from sparsejax.vision.api import grid_attention
from sparsejax.vision.api import neighborhood_attention
from sparsejax.vision.api import routing_attention
from sparsejax.vision.api import window_attention
from sparsejax.vision.implementations import NEIGHBORHOOD
from sparsejax.vision.implementations import ROUTING
from sparsejax.vision.implementations import WINDOW
from sparsejax.vision.permute import grid_partition
from sparsejax.vision.permute import grid_unpartition
from sparsejax.vision.permute import na_tile_permute
from sparsejax.vision.permute import na_tile_unpermute
from sparsejax.vision.permute import window_partition
from sparsejax.vision.permute import window_unpartition

__all__ = ["block_attention", "grid_attention", "window_attention",
           "neighborhood_attention", "routing_attention", "permute",
           "reference", "relative_bias", "natten", "routing", "WINDOW",
           "NEIGHBORHOOD", "ROUTING", "window_partition",
           "window_unpartition", "grid_partition", "grid_unpartition",
           "na_tile_permute", "na_tile_unpermute", "default_tile"]
