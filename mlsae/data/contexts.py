"""Token contexts: the corpus's documents as one token stream, cut into fixed-length contexts,
and the seeded train/eval split of those contexts.

Documents (`mlsae/data/corpus.py`) are joined into one token stream, each preceded by a separator
(the tokenizer's EOS token, else its BOS token), and the stream is cut into non-overlapping
contexts of `data.context` tokens. Everything is lazy: only as much of the corpus is read and
tokenised as the requested number of contexts needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mlsae.core.errors import MlsaeError
from mlsae.core.params import is_int

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Tokenisation batching: a batch holds about as many characters as the remaining tokens need
# (by a running chars-per-token estimate), within these bounds.
_INITIAL_CHARS_PER_TOKEN = 4.0
_MAX_BATCH_CHARS = 1 << 20
_MAX_BATCH_DOCS = 1024
# Documents longer than this are tokenised piece by piece (pieces end at a newline where
# possible), so one huge file never has to be tokenised whole when few tokens are needed.
_MAX_PIECE_CHARS = 1 << 20


@dataclass(frozen=True)
class Contexts:
    """Fixed-length token contexts cut from the corpus stream.

    Attributes:
        tokens: ``(n_contexts, context)`` int32 token ids.
        special: ``(n_contexts, context)`` bool, True where the id is one of the tokenizer's
            special ids (the document separators among them); masked downstream.
    """

    tokens: np.ndarray
    special: np.ndarray

    @property
    def n_contexts(self) -> int:
        """Number of contexts."""
        return int(self.tokens.shape[0])

    @property
    def context(self) -> int:
        """Tokens per context."""
        return int(self.tokens.shape[1])


def separator_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The document separator: the tokenizer's EOS id, else its BOS id."""
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return int(token_id)
    raise MlsaeError("model: the tokenizer has neither an EOS nor a BOS token to separate documents with")


def leading_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id when the tokenizer puts one before every text by itself (Gemma, Llama 3): such
    a model was trained with BOS at position 0 and misbehaves without it (Gemma 3 turns a later
    token into an attention sink with residual entries above float16's range). None for models
    that add no BOS (SmolLM2, GPT-NeoX, GPT-2) or whose BOS is the document separator."""
    bos = tokenizer.bos_token_id
    if bos is None or bos == separator_id(tokenizer):
        return None
    ids = tokenizer("a", return_attention_mask=False)["input_ids"]
    return int(bos) if ids[:1] == [bos] else None


def build_contexts(
    documents: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    context: int,
    n_contexts: int,
) -> Contexts:
    """Tokenise `documents` into `n_contexts` non-overlapping contexts of `context` tokens.

    The stream is ``SEP doc1 SEP doc2 ...`` (SEP from :func:`separator_id`; the tokenizer adds
    no special tokens of its own). Documents are pulled and tokenised in batches sized to the
    tokens still needed, and reading stops as soon as every context is full, so only about
    as much of the corpus is consumed as needed. For a model that expects a BOS
    (:func:`leading_bos`), each context is ``BOS`` and then ``context - 1`` tokens of the stream;
    BOS is a special token, so position 0 is masked downstream like every separator.

    Raises:
        MlsaeError: bad sizes, no separator token, or too little text for `n_contexts`.
    """
    _check_positive_int("data.context", context)
    _check_positive_int("number of contexts (data.train_tokens + data.eval_tokens)", n_contexts)
    sep = separator_id(tokenizer)
    bos = leading_bos(tokenizer)
    width = context - (bos is not None)
    if width < 1:
        raise MlsaeError(f"data.context must be at least 2 for a model that starts contexts with BOS (got {context})")
    needed = width * n_contexts
    stream = np.empty(needed, dtype=np.int32)
    filled = 0
    for ids in _token_runs(_pieces(documents), tokenizer, sep, lambda: needed - filled):
        take = min(len(ids), needed - filled)
        stream[filled : filled + take] = ids[:take]
        filled += take
        if filled == needed:
            break
    if filled < needed:
        raise MlsaeError(
            f"data.train_tokens + data.eval_tokens: need {needed} tokens ({n_contexts} contexts "
            f"of data.context={context}) but the corpus has only {filled}; lower them or use a "
            f"larger data.source"
        )
    tokens = stream.reshape(n_contexts, width)
    if bos is not None:
        tokens = np.concatenate([np.full((n_contexts, 1), bos, dtype=np.int32), tokens], axis=1)
    special_ids = np.asarray(sorted(set(tokenizer.all_special_ids) | {sep}), dtype=np.int64)
    return Contexts(tokens=tokens, special=np.isin(tokens, special_ids))


def _token_runs(
    pieces: Iterator[tuple[bool, str]],
    tokenizer: PreTrainedTokenizerBase,
    sep: int,
    remaining: Callable[[], int],
) -> Iterator[list[int]]:
    """Yield the token stream in runs, one per piece of :func:`_pieces`: ``[SEP, *doc]`` for a
    document's first piece.

    `remaining()` tells how many tokens the consumer still needs; each batch holds about that
    many tokens' worth of characters, by the chars-per-token ratio seen so far. A piece's run does
    not depend on how the pieces were batched.
    """
    chars_per_token = _INITIAL_CHARS_PER_TOKEN
    seen_chars = seen_tokens = 0
    while True:
        budget = min(_MAX_BATCH_CHARS, max(1, math.ceil(remaining() * chars_per_token)))
        batch: list[tuple[bool, str]] = []
        batch_chars = 0
        for starts_document, text in pieces:
            batch.append((starts_document, text))
            batch_chars += len(text)
            if batch_chars >= budget or len(batch) >= _MAX_BATCH_DOCS:
                break
        if not batch:
            return
        encoded = tokenizer(
            [text for _, text in batch],
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )["input_ids"]
        for (starts_document, _), ids in zip(batch, encoded, strict=True):
            seen_tokens += len(ids)
            yield [sep, *ids] if starts_document else list(ids)
        seen_chars += batch_chars
        if seen_tokens:
            chars_per_token = max(seen_chars / seen_tokens, 0.25)


def _pieces(documents: Iterable[str]) -> Iterator[tuple[bool, str]]:
    """Yield ``(starts_document, text)``; a long document comes in pieces ending at newlines."""
    for document in documents:
        start = 0
        while len(document) - start > _MAX_PIECE_CHARS:
            cut = document.rfind("\n", start, start + _MAX_PIECE_CHARS) + 1
            if cut <= start:
                cut = start + _MAX_PIECE_CHARS
            yield start == 0, document[start:cut]
            start = cut
        yield start == 0, document[start:]


class ContextStream:
    """The contexts of :func:`build_contexts`, drawn a few at a time, from a resumable position.

    Stream mode (`train.source: stream`) reads the corpus while it trains, so it cannot hold every
    context at once. ``take(n)`` returns the next `n` contexts, exactly the rows
    :func:`build_contexts` would give at that place; ``position`` is where the next context starts:
    ``{"piece": p, "offset": o, "context": c}`` means the first `p` document pieces (see
    :func:`_pieces`) are used up, the next one's first `o` tokens are too, and `c` contexts were
    taken. Built with a position, the stream skips those pieces without tokenising them (a resumed
    run re-reads no token it already consumed).
    """

    def __init__(
        self,
        documents: Iterable[str],
        tokenizer: PreTrainedTokenizerBase,
        context: int,
        n_contexts: int,
        position: dict | None = None,
    ):
        _check_positive_int("data.context", context)
        self.sep, self.bos = separator_id(tokenizer), leading_bos(tokenizer)
        self.width = context - (self.bos is not None)
        if self.width < 1:
            raise MlsaeError(
                f"data.context must be at least 2 for a model that starts contexts with BOS (got {context})"
            )
        self.context, self.n_contexts = context, n_contexts
        self.special_ids = np.asarray(sorted(set(tokenizer.all_special_ids) | {self.sep}), dtype=np.int64)
        position = dict(position or {"piece": 0, "offset": 0, "context": 0})
        pieces = _pieces(documents)
        for _ in range(position["piece"]):
            if next(pieces, None) is None:
                raise MlsaeError(
                    "data.source: the corpus is shorter than the resumed position; it changed since the checkpoint"
                )
        self._taken = position["context"]
        self._runs = _token_runs(
            pieces, tokenizer, self.sep, lambda: max(1, (self.n_contexts - self._taken) * self.width)
        )
        self._piece = position["piece"]  # index of the piece whose run is `self._run`
        self._run = np.zeros(0, dtype=np.int32)
        self._pos = 0  # tokens of `self._run` used
        self._skip = position["offset"]
        self._next_run(first=True)

    def _next_run(self, first: bool = False) -> bool:
        ids = next(self._runs, None)
        if ids is None:
            return False
        if not first:
            self._piece += 1
        self._run, self._pos = np.asarray(ids, dtype=np.int32), (self._skip if first else 0)
        return True

    @property
    def position(self) -> dict:
        """Where the next context starts (see the class docstring); JSON-able."""
        if self._pos >= len(self._run):  # the current run is used up: the next piece starts clean
            return {"piece": self._piece + 1, "offset": 0, "context": self._taken}
        return {"piece": self._piece, "offset": int(self._pos), "context": self._taken}

    def take(self, n: int) -> Contexts:
        """The next `n` contexts."""
        needed = n * self.width
        stream = np.empty(needed, dtype=np.int32)
        filled = 0
        while filled < needed:
            if self._pos >= len(self._run) and not self._next_run():
                raise MlsaeError(
                    f"data.train_tokens + data.eval_tokens: the corpus ran out after {self._taken + filled // self.width} "
                    f"contexts of data.context={self.context}; lower them or use a larger data.source"
                )
            take = min(len(self._run) - self._pos, needed - filled)
            stream[filled : filled + take] = self._run[self._pos : self._pos + take]
            self._pos += take
            filled += take
        self._taken += n
        tokens = stream.reshape(n, self.width)
        if self.bos is not None:
            tokens = np.concatenate([np.full((n, 1), self.bos, dtype=np.int32), tokens], axis=1)
        return Contexts(tokens=tokens, special=np.isin(tokens, self.special_ids))


# --------------------------------------------------------------------------------------------
# Sizes and split
# --------------------------------------------------------------------------------------------


def plan(train_tokens: int, eval_tokens: int, context: int) -> tuple[int, int]:
    """Contexts needed for the train and eval splits: ``ceil(tokens / context)`` each."""
    _check_positive_int("data.context", context)
    _check_positive_int("data.train_tokens", train_tokens)
    _check_positive_int("data.eval_tokens", eval_tokens)
    return -(-train_tokens // context), -(-eval_tokens // context)


def sample_contexts(n_train: int, sample_tokens: int, context: int) -> int:
    """Train contexts extract stores in stream mode (the sample the lens fit reads):
    ``ceil(data.sample_tokens / context)``, at most the `n_train` train contexts."""
    _check_positive_int("data.sample_tokens", sample_tokens)
    return min(n_train, -(-sample_tokens // context))


def split_contexts(n_contexts: int, n_eval: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Choose `n_eval` of `n_contexts` contexts for eval (seeded), the rest for train.

    Returns ``(train_idx, eval_idx)``: disjoint, each sorted ascending, int64, together
    covering ``range(n_contexts)``. Same arguments, same split (numpy ``default_rng(seed)``).
    """
    _check_positive_int("number of contexts", n_contexts)
    if not is_int(n_eval):
        raise MlsaeError(f"data.eval_tokens: eval context count must be an integer, got {n_eval!r}")
    if not 0 <= n_eval <= n_contexts:
        raise MlsaeError(f"data.eval_tokens: {n_eval} eval contexts requested out of {n_contexts} in all")
    if not is_int(seed) or seed < 0:
        raise MlsaeError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(seed)
    eval_idx = np.sort(rng.choice(n_contexts, size=n_eval, replace=False)).astype(np.int64)
    is_eval = np.zeros(n_contexts, dtype=bool)
    is_eval[eval_idx] = True
    train_idx = np.flatnonzero(~is_eval).astype(np.int64)
    return train_idx, eval_idx


def _check_positive_int(key: str, value: object) -> None:
    """Raise :class:`MlsaeError` naming `key` unless `value` is an integer > 0."""
    if not is_int(value) or value <= 0:
        raise MlsaeError(f"{key} must be a positive integer, got {value!r}")
