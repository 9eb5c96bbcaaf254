"""Linear attention: Lightning Attention-2 (chunked, with decay) and decode."""
