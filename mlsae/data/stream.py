"""Stream mode (`train.source: stream`): train batches computed from the corpus while training runs.

Store mode trains on the train split that extract stored (34.5 KB per token for SmolLM2). Stream
mode never stores it: the train stage reads the corpus, runs the model, and fills the same kind of
shuffle buffer from the residuals, so disk use does not grow with `data.train_tokens` and memory
is bounded by the buffer (see Memory below).

Which contexts. Extract splits the corpus's head by document (:class:`mlsae.data.contexts.DocumentSplit`,
recorded in the store's attrs) into the eval split and the *sample*: the first
``n_sample = ceil(data.sample_tokens / context)`` contexts of the train documents (at most the
train count; the lens fit reads it). The train contexts are the train documents' stream cut into
contexts exactly as in store mode (:class:`mlsae.data.contexts.ContextStream` gives
:func:`~mlsae.data.contexts.build_contexts`'s rows): the sample, then what follows it, `n_train`
in all. With ``data.sample_tokens >= data.train_tokens`` the split is store mode's exactly.

Batches. Per epoch the train contexts, in corpus order, fill buffers of
``C = shuffle_buffer_tokens // context`` contexts. A buffer's residuals are cast to
`extract.dtype` (what store mode reads back from its store), its kept tokens (not special; not
position 0 when the store says `skip_first`) are permuted with ``default_rng([train.seed, epoch,
buffer, 1])`` and cut into batches of `batch_tokens`, dropping the remainder: BatchPlan's rule,
with buffers visited in corpus order instead of a seeded chunk order. So on equal splits, store
mode with ``chunk_order="sequential"`` and one store chunk per buffer gives the same batches
(tests/test_stream.py checks the weights).

Under torchrun, rank r computes the buffer's contexts r, r+W, r+2W, ... (disjoint slices), permutes
its own kept tokens with ``default_rng([train.seed, epoch, buffer, 1, r])`` and yields
``batch_tokens // W`` of them per step; the ranks agree on each buffer's batch count (the
minimum over ranks), so they always take the same number of steps.

Resume. ``state()`` is the epoch, the buffer, the corpus position after it and the buffer's
not-yet-consumed batch rows (in storage dtype, every rank's). The checkpoint carries it, so a
resumed run continues inside the buffer and then reads the corpus from that position: no token it
already consumed is tokenised or run through the model again (the documents before the position
are read to skip them, which a sequential source such as a streamed hub dataset requires).

Memory: one buffer of residuals in storage dtype (about two while the next one is built; more
only if b_pre's sample, `train.geometric_median_sample` tokens, spans several buffers), plus every
rank's remaining rows while a checkpoint is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from mlsae.core.errors import MlsaeError
from mlsae.core.params import DataParams, ExtractParams, TrainParams
from mlsae.data import contexts, corpus
from mlsae.models.registry import LoadedModel
from mlsae.stores import activations as store


@dataclass
class _Buffer:
    epoch: int
    index: int
    data: torch.Tensor  # (tokens, layers, d_model), storage dtype
    order: np.ndarray  # rows of `data` batched in order: n_batches * local_batch of them
    n_batches: int
    end: dict  # corpus position after the buffer's last context
    consumed: int = 0


class StreamBatches:
    """This rank's train batches in stream mode; see the module docstring for the rules."""

    def __init__(
        self,
        data: DataParams,
        train: TrainParams,
        extract: ExtractParams,
        split: contexts.DocumentSplit,
        model: LoadedModel,
        layers: list[int],
        skip_first: bool,
        rank: int = 0,
        world: int = 1,
        progress: bool = False,
    ):
        self.data, self.train, self.extract, self.split = data, train, extract, split
        self.model, self.layers, self.skip_first = model, layers, skip_first
        self.rank, self.world = rank, world
        self.progress = progress
        self.n_train, self.n_eval = contexts.plan(data.train_tokens, data.eval_tokens, data.context)
        self.n_sample = contexts.sample_contexts(self.n_train, data.sample_tokens, data.context)
        self.buffer_contexts = train.shuffle_buffer_tokens // data.context
        if self.buffer_contexts * data.context < train.batch_tokens:
            raise MlsaeError(
                f"train.shuffle_buffer_tokens: {train.shuffle_buffer_tokens} holds "
                f"{self.buffer_contexts} whole contexts of data.context={data.context}, fewer tokens than "
                f"train.batch_tokens={train.batch_tokens}; raise it"
            )
        if train.batch_tokens % world:
            raise MlsaeError(
                f"train.batch_tokens: {train.batch_tokens} is not a multiple of the {world} "
                "torchrun processes (stream mode gives each the same share)"
            )
        self.local_batch = train.batch_tokens // world
        self.buffers_per_epoch = -(-self.n_train // self.buffer_contexts)
        self._memo: dict[tuple[int, int], _Buffer] = {}  # buffers b_pre's sample read, kept for the run
        self._current: _Buffer | None = None
        self.model_tokens = 0  # tokens this rank ran through the model (benchmarks, metrics)

    def expected_batches(self, kept: float) -> int:
        """The run's steps if a fraction `kept` of every buffer's tokens is usable (the stored sample's
        fraction, for the learning-rate schedule: the exact count needs the whole corpus)."""
        per_epoch = 0
        for b in range(self.buffers_per_epoch):
            n = min(self.n_train, (b + 1) * self.buffer_contexts) - b * self.buffer_contexts
            per_epoch += int(n * self.data.context * kept) // self.train.batch_tokens
        return max(1, self.train.epochs * per_epoch)

    def _open(self, position: dict | None) -> contexts.ContextStream:
        data = self.data
        documents = corpus.ordered_documents(data.source, data.shuffle_documents, data.seed)
        return contexts.ContextStream(
            contexts.train_documents(documents, self.split),
            self.model.tokenizer,
            data.context,
            self.n_train,
            position,
            corpus.resolve_document_tokens(data.source, data.document_tokens),
        )

    def _load(self, epoch: int, b: int, stream: contexts.ContextStream) -> _Buffer:
        """Read buffer `b`'s contexts from `stream` and compute this rank's share of its batches."""
        lo_t, hi_t = b * self.buffer_contexts, min(self.n_train, (b + 1) * self.buffer_contexts)
        ctx = stream.take(hi_t - lo_t)
        mine = np.arange(hi_t - lo_t)[self.rank :: self.world]
        tokens, special = ctx.tokens[mine], ctx.special[mine]
        data = self._residuals(tokens)
        keep = ~special
        if self.skip_first:
            keep[:, 0] = False
        ids = np.flatnonzero(keep.reshape(-1))
        key = [self.train.seed, epoch, b, 1] + ([self.rank] if self.world > 1 else [])
        ids = ids[np.random.default_rng(key).permutation(len(ids))]
        n_batches = len(ids) // self.local_batch
        if self.world > 1:
            count = torch.tensor(n_batches, device=self._collective_device())
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            n_batches = int(count.item())
        return _Buffer(epoch, b, data, ids[: n_batches * self.local_batch], n_batches, stream.position)

    def _residuals(self, tokens: np.ndarray) -> torch.Tensor:
        """(contexts x context, layers, d_model) residuals of the selected blocks, in storage dtype."""
        parts = []
        batch = self.extract.batch_size
        bar = tqdm(total=tokens.size, unit="tok", desc="stream", leave=False, disable=not self.progress)
        for lo in range(0, tokens.shape[0], batch):
            ids = torch.from_numpy(tokens[lo : lo + batch]).long()
            resid = self.model.residuals(ids)[:, :, self.layers]  # (B, T, L, d) float32
            # the store's cast: refuses non-finite values, rounds like a store write and read
            parts.append(
                store.from_storage(
                    store.to_storage(resid.reshape(-1, *resid.shape[2:]), self.extract.dtype), self.extract.dtype
                )
            )
            self.model_tokens += ids.numel()
            bar.update(ids.numel())
        bar.close()
        if not parts:  # a last buffer with fewer contexts than ranks
            return torch.empty((0, len(self.layers), self.model.d_model), dtype=store.TORCH_DTYPES[self.extract.dtype])
        return torch.cat(parts)

    def _collective_device(self) -> torch.device:
        return (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )

    def _yield(self, buf: _Buffer) -> Iterator[torch.Tensor]:
        self._current = buf
        lb = self.local_batch
        while buf.consumed < buf.n_batches:
            rows = torch.from_numpy(buf.order[buf.consumed * lb : (buf.consumed + 1) * lb])
            buf.consumed += 1
            yield buf.data[rows].float()

    def batches(self, resume: dict | None = None) -> Iterator[torch.Tensor]:
        """This rank's batches (local_batch, layers, d_model) float32, from the start or from a
        checkpoint's `state()`."""
        epoch0, b0, position = 0, 0, None
        if resume is not None:
            rows = resume["rows"][self.rank]
            n = rows.shape[0] // self.local_batch
            buf = _Buffer(resume["epoch"], resume["buffer"], rows, np.arange(n * self.local_batch), n, resume["end"])
            yield from self._yield(buf)
            epoch0, b0, position = resume["epoch"], resume["buffer"] + 1, resume["end"]
            if b0 == self.buffers_per_epoch:
                epoch0, b0, position = epoch0 + 1, 0, None
        yield from self._run(epoch0, b0, position, memoize=False)

    def first_batches(self) -> Iterator[torch.Tensor]:
        """The run's batches from the start, for b_pre's sample: the buffers it reads (usually the
        first alone) are kept, so that `batches` does not run the model on them again."""
        yield from self._run(0, 0, None, memoize=True)

    def _run(self, epoch0: int, b0: int, position: dict | None, memoize: bool) -> Iterator[torch.Tensor]:
        for epoch in range(epoch0, self.train.epochs):
            stream = None
            for b in range(b0 if epoch == epoch0 else 0, self.buffers_per_epoch):
                self._current = None  # let the previous buffer go before the next one is built
                memo = None if memoize else self._memo.pop((epoch, b), None)
                if memo is not None:  # built for b_pre's sample: continue the corpus after it
                    buf, stream, position = replace(memo, consumed=0), None, memo.end
                else:
                    if stream is None:
                        stream = self._open(position if epoch == epoch0 else None)
                    buf = self._load(epoch, b, stream)
                    if memoize:  # kept as built; `batches` takes it with consumed reset
                        self._memo[epoch, b] = buf
                yield from self._yield(buf)
                del buf

    def state(self) -> dict:
        """What a checkpoint needs to continue exactly here (call between steps; every rank must)."""
        buf = self._current
        if buf is None:
            raise RuntimeError("state() before the first batch")
        lb = self.local_batch
        rows = buf.data[torch.from_numpy(buf.order[buf.consumed * lb :])]
        return {"epoch": buf.epoch, "buffer": buf.index, "end": buf.end, "rows": self._gather(rows)}

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """(world, rows, layers, d_model): every rank's remaining rows (equal counts: the ranks
        consumed the same number of equal-sized batches of equal-length buffers). Gloo and NCCL
        both gather float16, bfloat16 and float32 as they are."""
        if self.world == 1:
            return rows[None].clone()
        local = rows.contiguous().to(self._collective_device())
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local)
        return torch.stack(out).cpu()

    def total_model_tokens(self) -> int:
        """Tokens all ranks ran through the model (a collective under torchrun: every rank calls it)."""
        if self.world == 1:
            return self.model_tokens
        count = torch.tensor(self.model_tokens, device=self._collective_device())
        dist.all_reduce(count)
        return int(count.item())


def check_store(data: DataParams | None, train_source: str, attrs: dict) -> contexts.DocumentSplit:
    """The store's document split, after refusing a store that `train.source` cannot train with.

    Store mode needs the stored train split: a stream-mode store holds only a sample of it, and is
    refused. Stream mode trains on the train documents of the store's own split
    (:func:`~mlsae.data.contexts.train_documents`), so it never sees one of the store's eval
    documents whatever its budget; it needs a store cut from the same documents (corpus, seeds,
    shuffle, per-document cut, context, eval size), or the split would name other documents. DVC
    keeps the two in step (`train.source` and `data` are extract params); this catches a stage run
    by hand, or a study that trains several budgets on one store.
    """
    stream_store = attrs.get("train_source") == "stream"
    if train_source == "store" and stream_store:
        raise MlsaeError(
            "train.source: store, but the activation store was extracted for stream mode (it holds only "
            "a sample of the train split); rerun extract, or set train.source: stream"
        )
    split = contexts.DocumentSplit(**attrs["split"])
    if train_source != "stream" or data is None:
        return split
    same = (
        attrs.get("eval_tokens") == data.eval_tokens
        and attrs.get("context") == data.context
        and attrs.get("data_seed") == data.seed
        and attrs.get("corpus") == data.source
        and attrs.get("shuffle_documents") == corpus.resolve_shuffle(data.source, data.shuffle_documents)
        and attrs.get("document_tokens") == corpus.resolve_document_tokens(data.source, data.document_tokens)
    )
    if not same:
        raise MlsaeError(
            "train.source: stream, but the activation store was cut from other documents (other data.source, "
            "data.seed, data.shuffle_documents, data.document_tokens, data.context or data.eval_tokens); "
            "rerun extract"
        )
    return split
