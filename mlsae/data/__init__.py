"""Where tokens come from: the corpus, contexts, the train split's shuffled batches, stream mode, and extraction of residuals."""
