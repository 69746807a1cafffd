"""Language models: the registry and loading, the GGUF cache, the hub probe, tiny test models, splicing."""
