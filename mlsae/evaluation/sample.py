"""The spliced sample: the eval contexts that the baseline and evaluate stages run spliced forwards on.

Splicing costs a model forward per (context, layer, variant), so the downstream metrics run on a
sample of the eval split, not all of it: ``ceil(evaluate.tokens / context)`` whole contexts drawn
at random without replacement (``numpy.random.default_rng([data.seed, 2])``), in split order. A
context is the unit a forward needs; the documents it holds (or holds part of) are the units the
intervals resample (mlsae/stats/bootstrap.py). The baseline stage and the evaluate stage draw the
same sample from the same store and seed, and evaluate checks that they did (`fingerprint`).

`evaluate.tokens: auto` is the lesser of 2,048 and the eval split; an explicit value more than
the split is an error (the check stage says so before anything runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlsae.core.errors import MlsaeError
from mlsae.core.io import short_hash
from mlsae.core.paths import DOCUMENT, SPECIAL, TOKENS
from mlsae.stores.activations import ActivationStore

AUTO_TOKENS = 2048
"""`evaluate.tokens: auto`: this many tokens, or the whole eval split if it is smaller."""


def resolve_tokens(tokens: int | str, split_tokens: int, context: int) -> int:
    """`evaluate.tokens` as a number of tokens: `auto` is ``min(AUTO_TOKENS, split)``; an explicit
    value must fit in the eval split (`split_tokens` tokens in contexts of `context`)."""
    if tokens == "auto":
        return min(AUTO_TOKENS, split_tokens)
    assert isinstance(tokens, int)
    if tokens > split_tokens:
        raise MlsaeError(
            f"evaluate.tokens: {tokens} is more than the eval split's {split_tokens} tokens "
            f"({split_tokens // context} contexts of {context}); lower it or raise data.eval_tokens"
        )
    return tokens


@dataclass(frozen=True)
class SplicedSample:
    """The sampled contexts, in split order."""

    contexts: np.ndarray
    """(C,) indices of the sampled eval contexts, ascending."""
    tokens: np.ndarray
    """(C, T) token ids."""
    special: np.ndarray
    """(C, T) bool: special tokens (document separators among them)."""
    excluded: np.ndarray
    """(C, T) bool: positions left out (special tokens; position 0 when the store skips it)."""
    document: np.ndarray
    """(C, T) int64: each token's document id (the resampling unit)."""

    def fingerprint(self) -> str:
        """Identifies the sample (its contexts and their tokens), so two stages can check that they
        spliced the same one."""
        return short_hash({"contexts": self.contexts.tolist(), "tokens": short_hash(self.tokens.tolist())})


def spliced_sample(reader: ActivationStore, tokens: int | str, seed: int) -> SplicedSample:
    """The spliced sample of `reader`'s eval split: `tokens` is `evaluate.tokens`, `seed` is
    `data.seed`."""
    context = int(reader.attrs["context"])
    n_contexts = reader.n_tokens("eval") // context
    n_tokens = resolve_tokens(tokens, n_contexts * context, context)
    n_sample = min(n_contexts, -(-n_tokens // context))
    rng = np.random.default_rng([seed, 2])
    chosen = np.sort(rng.choice(n_contexts, size=n_sample, replace=False)).astype(np.int64)
    rows = (chosen[:, None] * context + np.arange(context)[None, :]).reshape(-1)
    split = reader.split("eval")
    shape = (n_sample, context)
    return SplicedSample(
        contexts=chosen,
        tokens=np.asarray(split[TOKENS][:])[rows].reshape(shape),
        special=np.asarray(split[SPECIAL][:])[rows].reshape(shape).astype(bool),
        excluded=~reader.keep("eval")[rows].reshape(shape),
        document=np.asarray(split[DOCUMENT][:])[rows].reshape(shape).astype(np.int64),
    )
