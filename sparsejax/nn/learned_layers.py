"""NNX layers of the learned family, registered as attention layer variants."""
