"""Low-rank attention: Performer features and Scatterbrain (sparse + low-rank)."""
