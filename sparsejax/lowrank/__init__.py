"""Low-rank attention: Performer features and Scatterbrain (sparse + low-rank).

  performer_features(x, projection, *, scale=None)     phi(x), positive features
  orthogonal_gaussian_projection(key, m, head_dim)     W [m, head_dim]
  performer_attention(q, k, v, projection, *, causal=False, scale=None)
  scatterbrain_attention(q, k, v, mask, projection, *, causal=False,
                         scale=None, impl="auto", interpret=False)

Layered as the core: features (features.py) -> low-rank states (states.py)
-> the dense references (reference.py), the blockwise jnp path (xla.py) and
the Pallas kernels in pallas_kernels/*/scatterbrain_attention.py, one
custom_vjp (vjp.py) and one registry (implementations.py) behind api.py.
"""

from sparsejax.lowrank.api import empty_support
from sparsejax.lowrank.api import scatterbrain_attention
from sparsejax.lowrank.features import orthogonal_gaussian_projection
from sparsejax.lowrank.features import performer_features
from sparsejax.lowrank.implementations import REGISTRY
from sparsejax.lowrank.performer import performer_attention
from sparsejax.lowrank.reference import performer_reference
from sparsejax.lowrank.reference import scatterbrain_reference

__all__ = ["empty_support", "orthogonal_gaussian_projection",
           "performer_attention", "performer_features",
           "performer_reference", "scatterbrain_attention",
           "scatterbrain_reference", "REGISTRY"]
