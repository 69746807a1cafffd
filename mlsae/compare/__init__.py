"""`mlsae compare`: experiments side by side, and finished runs of different models."""
