"""Token contexts: the corpus's documents as token streams, split by document into train and eval,
and cut into fixed-length contexts.

Documents (`mlsae/data/corpus.py`, in their corpus order) are numbered 0, 1, 2, ...: that number is
each token's document id. A seeded :class:`DocumentSplit` sends every document, whole, to the eval
or the train split, so no document contributes to both; each split's documents are joined into one
token stream, each preceded by a separator (the tokenizer's EOS token, else its BOS token) and
optionally cut to its first `data.document_tokens` tokens, and the stream is cut into
non-overlapping contexts of `data.context` tokens. A context can hold the ends and starts of
several documents; every token keeps its own document id. Everything is lazy: only as much of the
corpus is read and tokenised as the requested number of contexts needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

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
# With a per-document token cut, a document's first this-many characters per token kept are read
# (no tokenizer's token is that long, so the cut falls inside what was read).
_CHARS_PER_TOKEN_BOUND = 64


@dataclass(frozen=True)
class Contexts:
    """Fixed-length token contexts cut from the corpus stream.

    Attributes:
        tokens: ``(n_contexts, context)`` int32 token ids.
        special: ``(n_contexts, context)`` bool, True where the id is one of the tokenizer's
            special ids (the document separators among them); masked downstream.
        document: ``(n_contexts, context)`` int64, the document each token comes from: its index
            in the corpus order the contexts were cut from (a document's separator belongs to it; a
            context's leading BOS to the document of the token after it). The resampling unit of
            every interval.
    """

    tokens: np.ndarray
    special: np.ndarray
    document: np.ndarray

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


@dataclass(frozen=True)
class _Format:
    """How a tokenizer's contexts are laid out: separator, optional leading BOS, special ids."""

    sep: int
    bos: int | None
    width: int  # stream tokens per context (context, less the leading BOS)
    special_ids: np.ndarray

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, context: int) -> _Format:
        sep, bos = separator_id(tokenizer), leading_bos(tokenizer)
        width = context - (bos is not None)
        if width < 1:
            raise MlsaeError(
                f"data.context must be at least 2 for a model that starts contexts with BOS (got {context})"
            )
        special_ids = np.asarray(sorted(set(tokenizer.all_special_ids) | {sep}), dtype=np.int64)
        return cls(sep, bos, width, special_ids)


class _Cutter:
    """Cuts one token stream (runs of ``(document, ids)``) into `n_contexts` contexts, with a
    leading BOS per context for models that expect one."""

    def __init__(self, fmt: _Format, n_contexts: int):
        self.fmt = fmt
        self.needed = fmt.width * n_contexts
        self.stream = np.empty(self.needed, dtype=np.int32)
        self.document = np.empty(self.needed, dtype=np.int64)
        self.filled = 0

    @property
    def full(self) -> bool:
        return self.filled == self.needed

    def add(self, document: int, ids: np.ndarray) -> int:
        """Append as much of `ids` as fits; returns how many tokens were taken."""
        take = min(len(ids), self.needed - self.filled)
        self.stream[self.filled : self.filled + take] = ids[:take]
        self.document[self.filled : self.filled + take] = document
        self.filled += take
        return take

    def contexts(self) -> Contexts:
        width, bos = self.fmt.width, self.fmt.bos
        n = self.filled // width
        tokens = self.stream[: n * width].reshape(n, width)
        document = self.document[: n * width].reshape(n, width)
        if bos is not None:
            tokens = np.concatenate([np.full((n, 1), bos, dtype=np.int32), tokens], axis=1)
            document = np.concatenate([document[:, :1], document], axis=1)
        return Contexts(tokens=tokens, special=np.isin(tokens, self.fmt.special_ids), document=document)


def build_contexts(
    documents: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    context: int,
    n_contexts: int,
    document_tokens: int = 0,
) -> Contexts:
    """Tokenise `documents` into `n_contexts` non-overlapping contexts of `context` tokens.

    The stream is ``SEP doc0 SEP doc1 ...`` (SEP from :func:`separator_id`; the tokenizer adds
    no special tokens of its own), each document cut to its first `document_tokens` tokens
    (its separator included; 0: whole documents); document `i` is the `i`-th of `documents`.
    Documents are pulled and tokenised in batches sized to the tokens still needed, and reading
    stops as soon as every context is full, so only about as much of the corpus is consumed as
    needed. For a model that expects a BOS (:func:`leading_bos`), each context is ``BOS`` and then
    ``context - 1`` tokens of the stream; BOS is a special token, so position 0 is masked
    downstream like every separator.

    Raises:
        MlsaeError: bad sizes, no separator token, or too little text for `n_contexts`.
    """
    _check_positive_int("data.context", context)
    _check_positive_int("number of contexts (data.train_tokens + data.eval_tokens)", n_contexts)
    cut = _Cutter(_Format.of(tokenizer, context), n_contexts)
    pieces = _pieces(enumerate(documents), document_tokens)
    for document, ids in _token_runs(pieces, tokenizer, cut.fmt.sep, lambda: cut.needed - cut.filled, document_tokens):
        cut.add(document, ids)
        if cut.full:
            break
    if not cut.full:
        raise MlsaeError(
            f"data.train_tokens + data.eval_tokens: need {cut.needed} tokens ({n_contexts} contexts "
            f"of data.context={context}) but the corpus has only {cut.filled}; lower them or use a "
            f"larger data.source"
        )
    return cut.contexts()


@dataclass(frozen=True)
class DocumentSplit:
    """Which documents are eval documents: document ``i`` is when ``i < eval_until`` and
    ``u_i < share``, with ``u_0, u_1, ...`` the uniform draws of ``default_rng([seed, 1])``.

    `share` is the eval split's share of the tokens the split is cut from (so eval and train fill
    at about the same pace); `eval_until` is the first document after the one that filled the eval
    split: every later document is a train document. No document is on both sides.
    """

    seed: int
    share: float
    eval_until: int

    def is_eval(self, documents: np.ndarray) -> np.ndarray:
        documents = np.asarray(documents, dtype=np.int64)
        draws = _draws(self.seed, int(documents.max()) + 1 if documents.size else 0)
        return (documents < self.eval_until) & (draws[documents] < self.share)

    def to_json(self) -> dict:
        return {"seed": self.seed, "share": self.share, "eval_until": self.eval_until}


def _draws(seed: int, n: int) -> np.ndarray:
    """The first `n` routing draws of `seed` (a prefix of the same sequence for every n)."""
    return np.random.default_rng([seed, 1]).random(n)


class _Draws:
    """The routing draws, grown in blocks as documents come (the same values as `_draws`)."""

    def __init__(self, seed: int):
        self.rng, self.values = np.random.default_rng([seed, 1]), np.zeros(0)

    def __call__(self, i: int) -> float:
        while i >= len(self.values):
            self.values = np.concatenate([self.values, self.rng.random(4096)])
        return float(self.values[i])


def build_splits(
    documents: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    context: int,
    n_train: int,
    n_eval: int,
    seed: int,
    document_tokens: int = 0,
) -> tuple[Contexts, Contexts, DocumentSplit]:
    """The train and eval contexts of a document-level split (:class:`DocumentSplit`), cut from one
    pass over `documents`: each document goes, whole, to the eval stream or the train stream, and
    each stream is cut into contexts as :func:`build_contexts` does. A document routed to a stream
    that is already full is not used (by store mode; stream mode trains on every train document).

    Raises:
        MlsaeError: bad sizes, or too little text for both splits.
    """
    _check_positive_int("data.context", context)
    _check_positive_int("train contexts (data.train_tokens)", n_train)
    _check_positive_int("eval contexts (data.eval_tokens)", n_eval)
    fmt = _Format.of(tokenizer, context)
    cuts = {"train": _Cutter(fmt, n_train), "eval": _Cutter(fmt, n_eval)}
    share = n_eval / (n_train + n_eval)
    draws, eval_until = _Draws(seed), None
    pieces = _pieces(enumerate(documents), document_tokens)
    remaining = lambda: sum(c.needed - c.filled for c in cuts.values())  # noqa: E731
    for document, ids in _token_runs(pieces, tokenizer, fmt.sep, remaining, document_tokens):
        split = "eval" if eval_until is None and draws(document) < share else "train"
        if cuts[split].full:
            continue
        cuts[split].add(document, ids)
        if split == "eval" and cuts["eval"].full:
            eval_until = document + 1
        if eval_until is not None and cuts["train"].full:
            break
    if eval_until is None or not cuts["train"].full:
        have = sum(c.filled for c in cuts.values())
        raise MlsaeError(
            f"data.train_tokens + data.eval_tokens: need {cuts['train'].needed + cuts['eval'].needed} tokens "
            f"({n_train} + {n_eval} contexts of data.context={context}) but the corpus gave only {have} to the "
            f"document split; lower them or use a larger data.source"
        )
    return cuts["train"].contexts(), cuts["eval"].contexts(), DocumentSplit(seed, share, eval_until)


def train_documents(documents: Iterable[str], split: DocumentSplit) -> Iterator[tuple[int, str]]:
    """``(document index, text)`` of the train documents of `split`, in corpus order."""
    draws = _Draws(split.seed)
    for i, text in enumerate(documents):
        if not (i < split.eval_until and draws(i) < split.share):
            yield i, text


def _token_runs(
    pieces: Iterator[tuple[int, bool, str]],
    tokenizer: PreTrainedTokenizerBase,
    sep: int,
    remaining: Callable[[], int],
    document_tokens: int = 0,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield the token stream in runs ``(document, ids)``, one per piece of :func:`_pieces`:
    ``[SEP, *doc]`` for a document's first piece, cut to `document_tokens` (0: no cut).

    `remaining()` tells how many tokens the consumer still needs; each batch holds about that
    many tokens' worth of characters, by the chars-per-token ratio seen so far. A piece's run does
    not depend on how the pieces were batched.
    """
    chars_per_token = _INITIAL_CHARS_PER_TOKEN
    seen_chars = seen_tokens = 0
    while True:
        budget = min(_MAX_BATCH_CHARS, max(1, math.ceil(remaining() * chars_per_token)))
        batch: list[tuple[int, bool, str]] = []
        batch_chars = 0
        for piece in pieces:
            batch.append(piece)
            batch_chars += len(piece[2])
            if batch_chars >= budget or len(batch) >= _MAX_BATCH_DOCS:
                break
        if not batch:
            return
        encoded = tokenizer(
            [text for _, _, text in batch],
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )["input_ids"]
        for (document, starts_document, _), ids in zip(batch, encoded, strict=True):
            seen_tokens += len(ids)
            run = [sep, *ids] if starts_document else list(ids)
            yield document, np.asarray(run[:document_tokens] if document_tokens else run, dtype=np.int32)
        seen_chars += batch_chars
        if seen_tokens:
            chars_per_token = max(seen_chars / seen_tokens, 0.25)


def _pieces(documents: Iterable[tuple[int, str]], document_tokens: int = 0) -> Iterator[tuple[int, bool, str]]:
    """Yield ``(document, starts_document, text)``; a long document comes in pieces ending at
    newlines. With a `document_tokens` cut only the document's head is read: its first
    ``_CHARS_PER_TOKEN_BOUND * document_tokens`` characters, as one piece."""
    for document, text in documents:
        if document_tokens:
            yield document, True, text[: _CHARS_PER_TOKEN_BOUND * document_tokens]
            continue
        start = 0
        while len(text) - start > _MAX_PIECE_CHARS:
            cut = text.rfind("\n", start, start + _MAX_PIECE_CHARS) + 1
            if cut <= start:
                cut = start + _MAX_PIECE_CHARS
            yield document, start == 0, text[start:cut]
            start = cut
        yield document, start == 0, text[start:]


class ContextStream:
    """The contexts of :func:`build_contexts`, drawn a few at a time, from a resumable position.

    Stream mode (`train.source: stream`) reads the corpus while it trains, so it cannot hold every
    context at once. It is built on numbered documents (:func:`train_documents`), and
    ``take(n)`` returns the next `n` contexts, exactly the rows :func:`build_contexts` would give
    at that place on those documents; ``position`` is where the next context starts:
    ``{"piece": p, "offset": o, "context": c}`` means the first `p` document pieces (see
    :func:`_pieces`) are used up, the next one's first `o` tokens are too, and `c` contexts were
    taken. Built with a position, the stream skips those pieces without tokenising them (a resumed
    run re-reads no token it already consumed).
    """

    def __init__(
        self,
        documents: Iterable[tuple[int, str]],
        tokenizer: PreTrainedTokenizerBase,
        context: int,
        n_contexts: int,
        position: dict | None = None,
        document_tokens: int = 0,
    ):
        _check_positive_int("data.context", context)
        self.fmt = _Format.of(tokenizer, context)
        self.width, self.context, self.n_contexts = self.fmt.width, context, n_contexts
        position = dict(position or {"piece": 0, "offset": 0, "context": 0})
        pieces = _pieces(documents, document_tokens)
        for _ in range(position["piece"]):
            if next(pieces, None) is None:
                raise MlsaeError(
                    "data.source: the corpus is shorter than the resumed position; it changed since the checkpoint"
                )
        self._taken = position["context"]
        self._runs = _token_runs(
            pieces,
            tokenizer,
            self.fmt.sep,
            lambda: max(1, (self.n_contexts - self._taken) * self.width),
            document_tokens,
        )
        self._piece = position["piece"]  # index of the piece whose run is `self._run`
        self._document = -1
        self._run = np.zeros(0, dtype=np.int32)
        self._pos = 0  # tokens of `self._run` used
        self._skip = position["offset"]
        self._next_run(first=True)

    def _next_run(self, first: bool = False) -> bool:
        item = next(self._runs, None)
        if item is None:
            return False
        if not first:
            self._piece += 1
        self._document, self._run = item
        self._pos = self._skip if first else 0
        return True

    @property
    def position(self) -> dict:
        """Where the next context starts (see the class docstring); JSON-able."""
        if self._pos >= len(self._run):  # the current run is used up: the next piece starts clean
            return {"piece": self._piece + 1, "offset": 0, "context": self._taken}
        return {"piece": self._piece, "offset": int(self._pos), "context": self._taken}

    def take(self, n: int) -> Contexts:
        """The next `n` contexts."""
        cut = _Cutter(self.fmt, n)
        while not cut.full:
            if self._pos >= len(self._run) and not self._next_run():
                raise MlsaeError(
                    f"data.train_tokens + data.eval_tokens: the corpus ran out after "
                    f"{self._taken + cut.filled // self.width} contexts of data.context={self.context}; lower them "
                    f"or use a larger data.source"
                )
            self._pos += cut.add(self._document, self._run[self._pos :])
        self._taken += n
        return cut.contexts()


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


def _check_positive_int(key: str, value: object) -> None:
    """Raise :class:`MlsaeError` naming `key` unless `value` is an integer > 0."""
    if not is_int(value) or cast(int, value) <= 0:  # is_int: an int or a numpy integer
        raise MlsaeError(f"{key} must be a positive integer, got {value!r}")
