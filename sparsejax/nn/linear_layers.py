"""NNX layers of the linear family, registered as attention layer variants."""
