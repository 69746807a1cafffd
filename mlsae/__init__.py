"""mlsae: multi-layer sparse autoencoders over a language model's residual stream."""

__version__ = "0.1.0"
