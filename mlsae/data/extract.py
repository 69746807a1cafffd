"""The extract stage: corpus -> model -> residual stream of every block -> activation store.

Everything that can be wrong with the inputs (model, corpus, context length, an existing store
from another configuration) is checked before the store is touched. Shards of `resid` are written
by a background thread while the model computes the next one; the `done` counters in the store's
attrs make an interrupted run resume from the last finished shard.

Resume identity is by content: the store records the corpus's content hash
(`corpus.content_sha256`) next to every param that shapes it (`fingerprint_attrs`). An incomplete
store whose corpus content differs is discarded and started afresh (that content is gone, so it
could never be finished); one from other params is refused, so that those params can still resume
it. One process at a time writes a store (a lock next to it).
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from mlsae.core.errors import MlsaeError
from mlsae.core.io import exclusive, named, remove
from mlsae.core.params import FIRST_POSITION_OUTLIER, DataParams, ExtractParams
from mlsae.core.paths import DOCUMENT, POSITION, RESID, SPECIAL
from mlsae.data import contexts as token_contexts
from mlsae.data import corpus
from mlsae.models.registry import LoadedModel, load_model
from mlsae.stores import activations as store

if TYPE_CHECKING:
    import zarr


def fingerprint_attrs(
    model_name: str, data: DataParams, cfg: ExtractParams, train_source: str, model: LoadedModel
) -> dict:
    """What identifies the store's content: resuming is only allowed when all of it matches."""
    attrs = {
        "model": model_name,
        "revision": model.revision,
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "corpus": data.source,
        "corpus_sha256": corpus.content_sha256(data.source),
        "context": data.context,
        "train_tokens": data.train_tokens,
        "eval_tokens": data.eval_tokens,
        "dtype": cfg.dtype,
        "batch_size": cfg.batch_size,  # batch-mates change the rounding of a context's residuals
        "device": model.device.type,
        "data_seed": data.seed,
        "shuffle_documents": corpus.resolve_shuffle(data.source, data.shuffle_documents),
        "document_tokens": corpus.resolve_document_tokens(data.source, data.document_tokens),
    }
    if train_source == "stream":  # only the sample is stored, whatever the train budget beyond it
        n_train, _ = token_contexts.plan(data.train_tokens, data.eval_tokens, data.context)
        sample = token_contexts.sample_contexts(n_train, data.sample_tokens, data.context) * data.context
        attrs.update(train_tokens=None, sample_tokens=sample, train_source="stream")
    return attrs


def open_corpus(data: DataParams) -> Iterator[str]:
    """The documents of `data.source` in the order contexts are cut from (seeded shuffle with
    `data.shuffle_documents`), checked now: a missing or empty corpus fails here, before a model is
    loaded (which can take minutes), not after."""
    docs = corpus.ordered_documents(data.source, data.shuffle_documents, data.seed)
    first = next(docs, None)  # an empty corpus raises MlsaeError from inside the generator
    if first is None:
        raise MlsaeError(f"data.source {data.source!r}: corpus is empty (no non-empty document)")
    return itertools.chain([first], docs)


def head_contexts(data: DataParams, train_source: str) -> tuple[int, int]:
    """(train contexts, eval contexts) of the document split extract makes: store mode splits the
    whole slice; stream mode its head, the eval split and the sample (mlsae/data/stream.py)."""
    n_train, n_eval = token_contexts.plan(data.train_tokens, data.eval_tokens, data.context)
    if train_source == "stream":
        n_train = token_contexts.sample_contexts(n_train, data.sample_tokens, data.context)
    return n_train, n_eval


def prepare_splits(
    data: DataParams, train_source: str, model: LoadedModel, docs: Iterator[str] | None = None
) -> tuple[dict[str, store.SplitData], token_contexts.DocumentSplit]:
    """Tokenise the corpus (`docs`, default: opened from `data`) into the train and eval contexts
    of a seeded document split (mlsae/data/contexts.py). In stream mode the train split is only
    the sample: the head of the corpus is split instead (mlsae/data/stream.py)."""
    if data.context > model.max_context:
        raise MlsaeError(
            f"data.context: {data.context} exceeds the maximum context of model {model.name} ({model.max_context})"
        )
    n_train, n_eval = head_contexts(data, train_source)
    if docs is None:
        docs = open_corpus(data)
    document_tokens = corpus.resolve_document_tokens(data.source, data.document_tokens)
    train, evaluation, split = token_contexts.build_splits(
        docs, model.tokenizer, data.context, n_train, n_eval, data.seed, document_tokens
    )
    splits = {
        name: store.SplitData(
            tokens=c.tokens,
            special=c.special,
            context_index=np.arange(c.n_contexts, dtype=np.int32),
            document=c.document,
        )
        for name, c in (("train", train), ("eval", evaluation))
    }
    return splits, split


def open_for_writing(path: str, attrs: dict, splits: dict[str, store.SplitData]) -> tuple[zarr.Group, bool]:
    """(root group, resumed). An incomplete store of the same configuration is resumed; an
    incomplete one of another configuration is refused; a complete one is rebuilt, and so is
    one without a schema (`store.create` was interrupted before it wrote the attrs), and so is an
    incomplete one whose corpus content is not the corpus's content now (it can never be finished)."""
    if store.exists(path):
        old = dict(store.open_root(path).attrs)
        if "schema" not in old:
            remove(path)
            return store.create(path, attrs, splits), False
        same = all(old.get(k) == v for k, v in attrs.items()) and old.get("schema") == store.STORE_SCHEMA
        if not old.get("complete"):
            if same:
                return store.open_root(path, mode="r+"), True
            if old.get("corpus_sha256") != attrs["corpus_sha256"]:
                print(
                    f"notice: extract: {path}: the incomplete store was extracted from other corpus content "
                    f"(data.source {old.get('corpus')!r} has changed since); starting afresh",
                    file=sys.stderr,
                )
                remove(path)
                return store.create(path, attrs, splits), False
            raise MlsaeError(
                f"{path}: an incomplete store from another configuration (model {old.get('model')!r}, "
                f"corpus {old.get('corpus')!r}) is in the way; delete it or rerun with those params to resume it"
            )
        remove(path)
    return store.create(path, attrs, splits), False


def extract(
    model_name: str,
    data: DataParams,
    cfg: ExtractParams,
    train_source: str,
    out: str,
    progress: bool = True,
    stop_after_shards: int | None = None,
) -> dict:
    """Run the model over the corpus and fill the store at `out`; returns extract metrics.

    `train_source` is `train.source` (stream mode stores only the sample of the train split).
    `stop_after_shards` simulates an interruption (tests): return after writing that many shards.
    """
    docs = open_corpus(data)
    model = load_model(model_name, cfg.device)
    splits, split = prepare_splits(data, train_source, model, docs)
    attrs = {**fingerprint_attrs(model_name, data, cfg, train_source, model), "split": split.to_json()}
    with exclusive(store.lock_path(out), out):
        return _extract(data, cfg, model_name, out, model, splits, attrs, progress, stop_after_shards)


def _extract(
    data: DataParams,
    cfg: ExtractParams,
    model_name: str,
    out: str,
    model: LoadedModel,
    splits: dict[str, store.SplitData],
    attrs: dict,
    progress: bool,
    stop_after_shards: int | None,
) -> dict:
    root, resumed = open_for_writing(out, attrs, splits)
    shard_tokens = int(root.attrs["shard_tokens"])
    per_shard = shard_tokens // data.context
    done = dict(root.attrs["done"])

    work = []  # (split, shard index, first context, last context)
    for name, split_data in splits.items():
        n_contexts = split_data.tokens.shape[0]
        for s in range(done[name], -(-n_contexts // per_shard)):
            work.append((name, s, s * per_shard, min(n_contexts, (s + 1) * per_shard)))
    total = sum(hi - lo for _, _, lo, hi in work) * data.context

    def write(name: str, shard: int, lo: int, resid: np.ndarray) -> None:
        try:
            root[name][RESID][lo * data.context : lo * data.context + resid.shape[0]] = resid
        except OSError as e:  # e.g. disk full: name the store
            raise named(e, out) from None
        done[name] = shard + 1
        root.attrs["done"] = dict(done)  # only after the shard is on disk

    bar = tqdm(total=total, unit="tok", desc=f"extract {model_name}", disable=not progress)
    t0 = time.perf_counter()
    pending: Future | None = None
    written = 0
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            for name, shard, lo, hi in work:
                ids = torch.from_numpy(splits[name].tokens[lo:hi]).long()
                parts = []
                for start in range(0, ids.shape[0], cfg.batch_size):
                    batch = ids[start : start + cfg.batch_size]
                    resid = model.residuals(batch)  # (B, T, L, d)
                    # refuses non-finite values (a float16 overflow, a model gone NaN)
                    parts.append(store.to_storage(resid.reshape(-1, model.n_layers, model.d_model), cfg.dtype))
                    bar.update(batch.numel())
                if pending is not None:
                    pending.result()
                pending = pool.submit(write, name, shard, lo, np.concatenate(parts))
                written += 1
                if stop_after_shards is not None and written >= stop_after_shards:
                    pending.result()
                    bar.close()
                    return {}
            if pending is not None:
                pending.result()
    except MlsaeError:
        bar.close()
        if not resumed:  # a store this run created holds nothing worth resuming after a refusal
            remove(out)
        raise
    elapsed = time.perf_counter() - t0
    bar.close()

    ratio = first_position_norm_ratio(store.ActivationStore(out, allow_incomplete=True))
    skip = decide_skip_first(data.skip_first, ratio)
    root.attrs["skip_first"] = skip
    written_store = store.ActivationStore(out, allow_incomplete=True)
    cos = adjacent_cosine(written_store)  # over the kept tokens
    documents = {name: len(np.unique(written_store.meta(name, DOCUMENT)[written_store.keep(name)])) for name in splits}
    store.seal(root, out, "extract")  # every chunk present; the completion record, `complete` last
    n_tokens = sum(d.n_tokens for d in splits.values())
    return {
        "tokens": n_tokens,
        "train_tokens": splits["train"].n_tokens,
        "eval_tokens": splits["eval"].n_tokens,
        "train_documents": documents["train"],
        "eval_documents": documents["eval"],
        "tokens_per_s": total / elapsed if total else None,
        "resumed": resumed,
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "adjacent_cos": float(np.mean(cos)) if len(cos) else None,
        "adjacent_cos_by_layer": cos,
        "first_position_norm_ratio": max(ratio) if ratio else None,
        "first_position_norm_ratio_by_layer": ratio,
        "skip_first": skip,
    }


def decide_skip_first(setting: bool | str, ratio: list[float]) -> bool:
    """`data.skip_first`: true/false as given; `auto` skips position 0 when its mean residual norm is
    more than FIRST_POSITION_OUTLIER times the mean elsewhere at some block."""
    if setting == "auto":
        return bool(ratio) and max(ratio) > FIRST_POSITION_OUTLIER
    return bool(setting)


def first_position_norm_ratio(reader: store.ActivationStore, split: str = "eval", chunk: int = 4096) -> list[float]:
    """Per block: mean residual norm at position 0 over the mean norm at positions > 0 (non-special
    tokens only). Attention sinks show up as ratios far above 1."""
    n = reader.n_tokens(split)
    keep = ~reader.meta(split, SPECIAL)
    first = reader.meta(split, POSITION) == 0
    sums = np.zeros((2, reader.n_layers))
    counts = np.zeros(2)
    for start in range(0, n, chunk):
        norms = reader.resid(split, start, min(n, start + chunk)).double().norm(dim=-1).numpy()
        k, f = keep[start : start + len(norms)], first[start : start + len(norms)]
        for row, mask in enumerate((k & f, k & ~f)):
            sums[row] += norms[mask].sum(0)
            counts[row] += mask.sum()
    if counts.min() == 0:
        return []
    means = sums / counts[:, None]
    return (means[0] / means[1]).tolist()


def adjacent_cosine(reader: store.ActivationStore, split: str = "eval", chunk: int = 4096) -> list[float]:
    """Mean cosine similarity of mean-centred residuals at blocks (i, i+1), over the kept tokens
    (not special; not position 0 when the store skips it).

    Two streaming passes over the split: per-layer means, then per-token cosines.
    """
    L, d = reader.n_layers, reader.d_model
    total = torch.zeros(L, d, dtype=torch.float64)
    count = 0
    for x in reader.chunks(split, chunk):
        total += x.double().sum(0)
        count += x.shape[0]
    if count == 0 or L < 2:
        return []
    mean = total / count
    cos_sum = torch.zeros(L - 1, dtype=torch.float64)
    for x in reader.chunks(split, chunk):
        xc = x.double() - mean
        cos_sum += torch.nn.functional.cosine_similarity(xc[:, :-1], xc[:, 1:], dim=-1).sum(0)
    return (cos_sum / count).tolist()
