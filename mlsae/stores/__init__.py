"""The two Zarr stores, one reader and writer each: activations (extract) and latents (dump)."""
