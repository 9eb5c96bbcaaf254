"""NNX layers of the vision family, registered as attention layer variants."""
