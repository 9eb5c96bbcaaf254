"""NNX layers of the lowrank family, registered as attention layer variants."""
