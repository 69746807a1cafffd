"""The tuned lens: the translators and their files, loading the lens stage's output, fitting a lens."""
