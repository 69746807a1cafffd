"""The aggregate stage: the layer-variance decomposition, its compiled kernels, the streaming accumulator."""
