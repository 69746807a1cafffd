"""Foundations every stage shares: typed params, output paths, errors, atomic I/O, the stage runtime, metrics records."""
