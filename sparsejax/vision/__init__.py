"""Vision attention: MaxViT block/grid, neighborhood attention, BiFormer routing."""
