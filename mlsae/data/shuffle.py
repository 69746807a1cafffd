"""Shuffled token batches from the train split, with bounded memory and exact resume.

The split is cut into contiguous store chunks (so reads are contiguous). Each epoch
visits the chunks in a seeded random order (or in store order, `chunk_order="sequential"`: stream
mode's order, mlsae/data/stream.py); consecutive chunks fill a shuffle buffer of
`buffer_tokens` tokens, whose non-special tokens are permuted (seeded by epoch and buffer) and cut
into batches of `batch_tokens`; a buffer's remainder smaller than a batch is dropped. The plan is a
pure function of (seed, special mask), so batch number s can be located without reading the data
before it: resuming at step s reads nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mlsae.stores.activations import ActivationStore


@dataclass(frozen=True)
class Buffer:
    epoch: int
    index: int
    chunks: np.ndarray  # store chunk ids, in fill order
    n_batches: int


class BatchPlan:
    """Which tokens form each batch, for every epoch, without touching the residuals."""

    def __init__(
        self,
        special: np.ndarray,
        chunk_tokens: int,
        buffer_tokens: int,
        batch_tokens: int,
        epochs: int,
        seed: int,
        chunk_order: str = "shuffled",
    ):
        self.keep = ~special.astype(bool)
        self.n = len(self.keep)
        chunk_tokens = min(chunk_tokens, buffer_tokens)  # so that a buffer never exceeds buffer_tokens
        self.chunk_tokens = chunk_tokens
        self.chunks_per_buffer = max(1, buffer_tokens // chunk_tokens)
        self.batch_tokens = batch_tokens
        self.seed = seed
        n_chunks = -(-self.n // chunk_tokens)
        self.buffers: list[Buffer] = []
        for epoch in range(epochs):
            order = (
                np.random.default_rng([seed, epoch]).permutation(n_chunks)
                if chunk_order == "shuffled"
                else np.arange(n_chunks)
            )
            for b, start in enumerate(range(0, n_chunks, self.chunks_per_buffer)):
                chunks = order[start : start + self.chunks_per_buffer]
                n_valid = sum(int(self.keep[self._span(i)].sum()) for i in chunks)
                self.buffers.append(Buffer(epoch, b, chunks, n_valid // batch_tokens))

    def _span(self, chunk: int) -> slice:
        return slice(chunk * self.chunk_tokens, min(self.n, (chunk + 1) * self.chunk_tokens))

    @property
    def n_batches(self) -> int:
        return sum(b.n_batches for b in self.buffers)

    def token_ids(self, buf: Buffer) -> np.ndarray:
        """Global token indices of the buffer's non-special tokens, in shuffled order."""
        ids = np.concatenate([np.arange(self.n)[self._span(i)][self.keep[self._span(i)]] for i in buf.chunks])
        perm = np.random.default_rng([self.seed, buf.epoch, buf.index, 1]).permutation(len(ids))
        return ids[perm]


def iter_batches(
    reader: ActivationStore, layers: list[int], plan: BatchPlan, start: int = 0, rank: int = 0, world: int = 1
) -> Iterator[torch.Tensor]:
    """Batches (batch_tokens // world, len(layers), d_model) float32, from global batch `start` on.

    With `world` > 1 each rank gets its own slice of every global batch.
    """
    seen = 0
    row_of = np.full(plan.n, -1, dtype=np.int64)
    for buf in plan.buffers:
        if seen + buf.n_batches <= start or buf.n_batches == 0:  # nothing to yield: don't read it
            seen += buf.n_batches
            continue
        ids = plan.token_ids(buf)
        parts, offset = [], 0
        for chunk in buf.chunks:  # contiguous reads, one store chunk at a time, kept in storage dtype
            span = plan._span(int(chunk))
            parts.append(reader.resid("train", span.start, span.stop, layers, raw=True))
            row_of[span] = np.arange(offset, offset + span.stop - span.start)
            offset += span.stop - span.start
        data = torch.cat(parts)
        del parts
        for j in range(buf.n_batches):
            if seen + j < start:
                continue
            rows = torch.from_numpy(row_of[ids[j * plan.batch_tokens : (j + 1) * plan.batch_tokens]])
            batch = data[rows].float()
            yield batch[rank::world] if world > 1 else batch
        seen += buf.n_batches
