"""Studies that run the pipeline's library many times (convergence)."""
