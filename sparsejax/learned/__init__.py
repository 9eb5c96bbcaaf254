"""Learned and dynamic sparsity: SeerAttention, Routing Transformer, MInference."""
