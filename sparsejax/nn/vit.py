"""Vision Transformer that keeps the 2-D token grid [B, H, W, C].

Blocks see the grid; attention flattens it to H*W tokens and applies a mask
from the same registry as the LM (non-causal), so grid-aware variants can
later permute tokens (MaxViT windows) without touching the model.
"""

from typing import Any, Mapping, Optional

import jax.numpy as jnp
from flax import nnx

from sparsejax.nn import layers
from sparsejax.nn import lm


class ViT(nnx.Module):
  """images f32 [B, H, W, C] -> class logits f32 [B, num_classes]."""

  def __init__(self, *, image_shape, num_classes: int, patch_size: int,
               d_model: int, num_layers: int, num_heads: int,
               num_kv_heads: int, mlp_dim: int, attention: Mapping[str, Any],
               head_dim: Optional[int] = None, dtype=jnp.float32,
               rngs: nnx.Rngs):
    height, width, channels = image_shape
    if height % patch_size or width % patch_size:
      raise ValueError(f"image {image_shape[:2]} is not divisible by "
                       f"patch_size={patch_size}")
    self.grid = (height // patch_size, width // patch_size)
    seq_len = self.grid[0] * self.grid[1]
    head_dim = head_dim or d_model // num_heads
    mixers = lm.build_attention_layers(
        num_layers, attention, d_model=d_model, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, seq_len=seq_len,
        causal=False, rngs=rngs, dtype=dtype, use_rope=False, grid=self.grid)
    self.patch_size, self.dtype, self.seq_len = patch_size, dtype, seq_len
    self.w_patch = nnx.Param(nnx.initializers.lecun_normal()(
        rngs.params(), (patch_size * patch_size * channels, d_model)))
    self.pos_embed = nnx.Param(nnx.initializers.normal(0.02)(
        rngs.params(), (*self.grid, d_model)))
    self.blocks = nnx.List([
        layers.Block(d_model, mlp_dim, rngs=rngs, dtype=dtype,
                     attention=mixer) for mixer in mixers])
    self.final_norm = layers.RMSNorm(d_model)
    self.head = nnx.Linear(d_model, num_classes, rngs=rngs)

  def patchify(self, images):
    """[B, H, W, C] -> [B, H/p, W/p, p*p*C] (row-major patches)."""
    b, h, w, c = images.shape
    p = self.patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)

  def __call__(self, images):
    x = self.patchify(images.astype(self.dtype)) @ self.w_patch[...].astype(
        self.dtype)
    x = x + self.pos_embed[...].astype(self.dtype)  # [B, h, w, d]
    b, gh, gw, d = x.shape
    for block in self.blocks:
      # The grid is the model's layout; attention sees its row-major flatten.
      x = block(x.reshape(b, gh * gw, d)).reshape(b, gh, gw, d)
    x = self.final_norm(x).mean(axis=(1, 2))
    return self.head(x.astype(jnp.float32))

  flops_per_token = lm.flops_per_token  # pos_embed is not a matmul
