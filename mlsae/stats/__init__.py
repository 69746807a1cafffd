"""Uncertainty: resampling units, the bootstrap count matrix and intervals."""
