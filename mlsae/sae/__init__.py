"""The multi-layer SAE: model, kernels, trainer, encoding the eval split, import and export."""
