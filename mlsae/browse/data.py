"""What the latent browser shows, read from a finished run (latent store, analysis, SAE, model).

Layout of the payload (`collect` returns it; `page.render` inlines it as JSON):

* ``meta``: model, lens, layers (block indices), n_latents, k, n_tokens, and ``columns``: for each
  per-latent statistic the sentence saying which definition is shown (see `latent_columns`).
* ``vocab``: ``{token id: decoded string}`` for every id the page shows.
* ``latents``: one record per selected latent (the ``latents`` most often active, ties by index):
  ``count`` (active eval tokens), ``mu``/``sigma`` (mean and std of the layer position under
  P_f), ``within``, ``eff``, ``dist`` (P_f over the store's layers), ``hist`` (activation
  histogram), ``top``/``bottom`` (decoder logit lens), ``nn`` (nearest latents by decoder cosine)
  and ``ctx`` (top contexts, each with its layer x position heatmap for this latent).
* ``prompts``: a few eval contexts token by token; for each token its ``prompt_latents`` latents
  with the largest peak activation over layers, and their activation at every layer.

Definitions (``a[t, l, f]`` is latent f's stored top-k activation at eval token t and layer
position l; special tokens are left out of ``count``, ``hist`` and the top contexts):

* top contexts: a token's *peak* is ``max_l a[t, l, f]``; a latent's contexts are the eval
  contexts holding its largest peaks, one per context (the context's best token), ranked by
  peak, ties by token index. Each shows ``before`` tokens before the peak token and ``after`` after.
* heatmap: every stored entry ``(t, l)`` of the window with ``index == f`` and its value.
* histogram: counts of the active entries ``a[t, l, f] > 0`` (every layer) in ``bins`` equal bins
  over ``(0, max_{t,l} a[t, l, f]]``.
* decoder logit lens: with ``d_f`` the unit decoder column, the logit change along ``d_f`` is
  ``W_U (gamma * c(d_f))``: ``gamma`` is the final norm's weight, ``c`` removes the mean over
  d_model for a LayerNorm (identity for an RMSNorm), and the norm's per-vector scale (a positive
  number) is dropped because it does not change the ranking; biases add the same logits to every
  latent and are left out. The SAE standardises each vector (mean 0, std 1) before encoding, so
  ``d_f`` is a direction in the standardised space: a positive rescaling of the model's residual
  minus its mean, which the final norm treats the same way. With a tuned lens the SAE works in
  lens space, whose vectors the translators made ready for the final norm and unembedding, so the
  same formula is the tuned-lens reading. The page says which lens the run used.
* nearest latents: the largest ``cos(d_f, d_g)`` over latents g != f active on the eval split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from mlsae.core.errors import MlsaeError
from mlsae.core.params import BrowseParams
from mlsae.core.paths import CONTEXT, LATENT_STATS, SPECIAL, TOKENS
from mlsae.stores.latents import LatentChunk, LatentStore, open_latents

CHUNK_TOKENS = 1024


# ---------------------------------------------------------------------------------------------
# per-latent statistics


def latent_columns(df: pl.DataFrame, n_layers: int) -> tuple[pl.DataFrame, dict[str, str]]:
    """The table's columns from ``latents.parquet``, whichever analysis wrote it.

    Returns ``latent, count, mean_layer, std_layer, within_share, effective_layers, layer_dist``
    and one sentence per derived column saying which definition it holds: the parquet's own
    ``within_share`` / ``effective_layers`` when present, else today's stand-ins
    ``var_token_mean / var_layer`` (mean per-token layer variance over P_f's variance; null when
    P_f has zero variance) and ``L ** entropy`` (``entropy`` is P_f's entropy over ln L, so this is
    exp of the entropy in nats: the number of equally used layers with the same entropy).
    """
    notes = {}
    if "within_share" in df.columns:
        within = pl.col("within_share")
        notes["within_share"] = "within_share, as written by the aggregate stage"
    else:
        within = pl.when(pl.col("var_layer") > 0).then(pl.col("var_token_mean") / pl.col("var_layer"))
        notes["within_share"] = (
            "var_token_mean / var_layer: the mean per-token layer variance over "
            "P_f's variance (stand-in until the aggregate stage writes within_share)"
        )
    if "effective_layers" in df.columns:
        eff = pl.col("effective_layers")
        notes["effective_layers"] = "effective_layers, as written by the aggregate stage"
    else:
        eff = pl.lit(float(n_layers)) ** pl.col("entropy")
        notes["effective_layers"] = (
            "exp(entropy of P_f in nats) = L ** entropy: equally used layers with "
            "P_f's entropy (stand-in until the aggregate stage writes effective_layers)"
        )
    out = df.select(
        pl.col("latent").cast(pl.Int64),
        pl.col("count").cast(pl.Int64),
        pl.col("mean_layer").cast(pl.Float64),
        pl.col("std_layer").cast(pl.Float64),
        within.cast(pl.Float64).alias("within_share"),
        eff.cast(pl.Float64).alias("effective_layers"),
        pl.col("layer_dist"),
    )
    return out, notes


def select_latents(stats: pl.DataFrame, n: int) -> np.ndarray:
    """The ``n`` most often active latents (count > 0), ties by index, in that order."""
    top = stats.filter(pl.col("count") > 0).sort(["count", "latent"], descending=[True, False]).head(n)
    return top["latent"].to_numpy().astype(np.int64)


# ---------------------------------------------------------------------------------------------
# the latent store


@dataclass
class Store:
    """The latent store (`mlsae.stores.latents.LatentStore`, its one reader) and the per-token
    metadata the page needs. Only analysed tokens (`LatentStore.kept`: not special, not position 0
    when the run skips it) count in the statistics, top contexts, histograms and heatmaps, as in the
    aggregate stage."""

    latents: LatentStore
    tokens: np.ndarray
    special: np.ndarray
    kept: np.ndarray
    run_start: np.ndarray
    """For every token, the first row of its context (a context's rows are contiguous)."""
    run_end: np.ndarray
    """For every token, one past the last row of its context."""
    context: np.ndarray

    @property
    def layers(self) -> list[int]:
        return self.latents.blocks

    @property
    def n_latents(self) -> int:
        return self.latents.n_latents

    @property
    def k(self) -> int:
        return self.latents.k

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def chunks(self, desc: str, progress: bool) -> Iterator[tuple[int, int, LatentChunk]]:
        """(first row, stop row, the analysed tokens' entries) of each block of rows."""
        for lo in tqdm(range(0, self.n_tokens, CHUNK_TOKENS), desc=desc, unit="chunk", disable=not progress):
            hi = min(self.n_tokens, lo + CHUNK_TOKENS)
            yield lo, hi, self.latents.read(lo, hi)


def open_store(path: str | Path) -> Store:
    latents = open_latents(Path(path))
    context = latents.meta(CONTEXT)
    n = len(context)
    new_run = np.r_[True, context[1:] != context[:-1]] if n else np.zeros(0, bool)
    starts = np.flatnonzero(new_run)
    run = np.cumsum(new_run) - 1
    ends = np.r_[starts[1:], n]
    return Store(
        latents=latents,
        tokens=latents.meta(TOKENS),
        special=latents.meta(SPECIAL).astype(bool),
        kept=latents.kept(0, n),
        run_start=starts[run],
        run_end=ends[run],
        context=context,
    )


def _entries(chunk: LatentChunk, lookup: np.ndarray) -> tuple[np.ndarray, ...]:
    """(slot, token, layer, value) of the chunk's active entries of the selected latents."""
    slot = lookup[chunk.indices]
    keep = (slot >= 0) & (chunk.values > 0)
    row, layer, _ = np.nonzero(keep)
    return slot[keep], chunk.token[row], layer, chunk.values[keep]


def _top_contexts(cand: tuple[np.ndarray, ...], n: int) -> tuple[np.ndarray, ...]:
    """Keep each (slot, context)'s best entry, then each slot's ``n`` best; sorted by slot, rank."""
    s, ctx, t, layer, v = cand
    order = np.lexsort((t, -v, ctx, s))
    s, ctx, t, layer, v = (a[order] for a in (s, ctx, t, layer, v))
    first = np.r_[True, (s[1:] != s[:-1]) | (ctx[1:] != ctx[:-1])] if len(s) else np.zeros(0, bool)
    s, ctx, t, layer, v = (a[first] for a in (s, ctx, t, layer, v))
    order = np.lexsort((t, -v, s))
    s, ctx, t, layer, v = (a[order] for a in (s, ctx, t, layer, v))
    start = np.r_[True, s[1:] != s[:-1]] if len(s) else np.zeros(0, bool)
    group_start = np.maximum.accumulate(np.where(start, np.arange(len(s)), 0))
    keep = np.arange(len(s)) - group_start < n
    return tuple(a[keep] for a in (s, ctx, t, layer, v))


def scan(store: Store, selected: np.ndarray, p: BrowseParams, progress: bool = False) -> dict[str, Any]:
    """Two passes over the store: top contexts and max activation, then histograms and heatmaps.

    Returns ``contexts`` (per slot: list of dicts with the window's first row, peak row, peak
    value and layer position) , ``hist`` (slots x bins counts), ``max`` (per slot) and ``heat``
    (per (slot, rank): list of ``[row - first row, layer position, value]``)."""
    S = len(selected)
    lookup = np.full(store.n_latents, -1, dtype=np.int64)
    lookup[selected] = np.arange(S)
    vmax = np.zeros(S, dtype=np.float32)
    empty = (np.zeros(0, np.int64),) * 4 + (np.zeros(0, np.float32),)
    best: tuple[np.ndarray, ...] = empty
    for _, _, chunk in store.chunks("browse: contexts", progress):
        s, t, layer, v = _entries(chunk, lookup)
        np.maximum.at(vmax, s, v)
        cand = tuple(np.concatenate([a, b]) for a, b in zip(best, (s, store.context[t].astype(np.int64), t, layer, v)))
        best = _top_contexts(cand, p.contexts)
    s_b, _, t_b, l_b, v_b = best
    windows = []  # (first row, stop row, slot, rank)
    contexts: list[list[dict]] = [[] for _ in range(S)]
    for slot, peak, block, value in zip(s_b.tolist(), t_b.tolist(), l_b.tolist(), v_b.tolist()):
        first = max(int(store.run_start[peak]), peak - p.before)
        stop = min(int(store.run_end[peak]), peak + p.after + 1)
        contexts[slot].append({"first": first, "stop": stop, "peak": peak, "value": value, "layer": block})
        windows.append((first, stop, slot, len(contexts[slot]) - 1))
    windows.sort()
    heat: dict[tuple[int, int], list[list]] = {(s, r): [] for _, _, s, r in windows}
    hist = np.zeros((S, p.bins), dtype=np.int64)
    for lo, hi, chunk in store.chunks("browse: heatmaps", progress):
        s, _, _, v = _entries(chunk, lookup)
        if len(s):
            b = np.minimum(p.bins - 1, np.floor(v / vmax[s] * p.bins).astype(np.int64))
            np.add.at(hist, (s, b), 1)
        for a, stop, slot, rank in windows:
            if a >= hi:
                break
            if stop <= lo:
                continue
            inside = (chunk.token >= a) & (chunk.token < stop)
            hit = (chunk.indices[inside] == selected[slot]) & (chunk.values[inside] > 0)
            rows, layer, _ = np.nonzero(hit)
            vals = chunk.values[inside][hit]
            heat[(slot, rank)].extend(
                [[int(r - a), int(l_), float(x)] for r, l_, x in zip(chunk.token[inside][rows], layer, vals)]
            )
    return {"contexts": contexts, "hist": hist, "max": vmax, "heat": heat}


def prompts(store: Store, p: BrowseParams) -> list[dict[str, Any]]:
    """The first ``prompts`` eval contexts, token by token, with each token's strongest latents:
    ranked by peak ``max_l a[t, l, f]`` (ties by latent index), each with ``[layer, value]`` of
    every stored entry of that latent at that token."""
    out = []
    starts = np.unique(store.run_start)[: p.prompts]
    for a in starts.tolist():
        b = int(store.run_end[a])
        idx = np.asarray(store.latents.indices[a:b])
        val = np.asarray(store.latents.values[a:b], dtype=np.float32)
        val[~store.kept[a:b]] = 0  # tokens the analysis leaves out list no latents
        per_token = []
        layer_of = np.repeat(np.arange(idx.shape[1]), idx.shape[2])
        for i in range(b - a):
            ids, vals = idx[i].reshape(-1), val[i].reshape(-1)
            on = vals > 0
            ids, vals, layers = ids[on], vals[on], layer_of[on]
            order = np.lexsort((layers, ids))
            ids, vals, layers = ids[order], vals[order], layers[order]
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, np.int64)
            ends = np.r_[starts[1:], len(ids)].astype(np.int64)
            peak = np.maximum.reduceat(vals, starts) if len(ids) else np.zeros(0, np.float32)
            best = np.lexsort((ids[starts], -peak))[: p.prompt_latents]
            per_token.append(
                [
                    [
                        int(ids[starts[j]]),
                        _r(float(peak[j])),
                        [
                            [int(l_), _r(float(x), 3)]
                            for l_, x in zip(layers[starts[j] : ends[j]], vals[starts[j] : ends[j]])
                        ],
                    ]
                    for j in best
                ]
            )
        out.append({"tokens": store.tokens[a:b].tolist(), "special": store.special[a:b].tolist(), "latents": per_token})
    return out


# ---------------------------------------------------------------------------------------------
# decoder directions


@torch.no_grad()
def decoder_logit_lens(
    w_dec: torch.Tensor, norm: nn.Module, w_u: torch.Tensor, selected: np.ndarray, n: int, vocab: int, batch: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top and bottom ``n`` token ids (and logits) of ``W_U (gamma * c(d_f))`` for each selected
    latent (module docstring); ``w_dec`` is (d_model, n_latents), ``w_u`` (vocab, d_model), and
    only the first ``vocab`` rows of ``w_u`` (the tokenizer's ids) compete."""
    gamma = getattr(norm, "weight", None)
    w_u = w_u[:vocab].float()
    tops, topv, bots, botv = [], [], [], []
    for i in range(0, len(selected), batch):
        d = w_dec[:, torch.as_tensor(selected[i : i + batch])].float()
        if isinstance(norm, nn.LayerNorm):
            d = d - d.mean(0, keepdim=True)
        if gamma is not None:
            d = d * gamma.float()[:, None]
        logits = w_u @ d  # (vocab, batch)
        hi = logits.topk(n, dim=0)
        lo = logits.topk(n, dim=0, largest=False)
        tops.append(hi.indices.T)
        topv.append(hi.values.T)
        bots.append(lo.indices.T)
        botv.append(lo.values.T)
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros((0, n))  # noqa: E731
    return cat(tops), cat(topv), cat(bots), cat(botv)


@torch.no_grad()
def nearest_latents(
    w_dec: torch.Tensor, selected: np.ndarray, candidates: np.ndarray, n: int, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """For each selected latent the ``n`` candidate latents (excluding itself) with the largest
    decoder cosine: (ids, cosines), each (len(selected), n)."""
    cols = w_dec.float()
    cols = cols / cols.norm(dim=0, keepdim=True).clamp_min(1e-12)
    allowed = torch.zeros(cols.shape[1], dtype=torch.bool)
    allowed[torch.as_tensor(np.array(candidates, dtype=np.int64))] = True
    n = min(n, max(0, int(allowed.sum()) - 1))
    ids, cos = [], []
    for i in range(0, len(selected), batch):
        sel = torch.as_tensor(selected[i : i + batch], dtype=torch.long)
        c = cols[:, sel].T @ cols  # (batch, n_latents)
        c[:, ~allowed] = -math.inf
        c[torch.arange(len(sel)), sel] = -math.inf
        top = c.topk(n, dim=1)
        ids.append(top.indices)
        cos.append(top.values)
    if not ids:
        return np.zeros((0, n), np.int64), np.zeros((0, n))
    return torch.cat(ids).numpy(), torch.cat(cos).numpy()


# ---------------------------------------------------------------------------------------------
# everything together


def _r(x: float, digits: int = 4) -> float | None:
    """Round to ``digits`` significant digits (keeps the JSON small); None for NaN/None."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def collect(
    latents_path: str | Path,
    analysis_dir: str | Path,
    sae: Any,
    final_norm: nn.Module,
    w_u: torch.Tensor,
    decode: Callable[[int], str],
    vocab_size: int,
    p: BrowseParams,
    model: str = "",
    progress: bool = False,
) -> dict[str, Any]:
    """The browser's payload (module docstring) from a run's outputs."""
    store = open_store(latents_path)
    path = Path(analysis_dir) / LATENT_STATS.name
    if not path.is_file():
        raise MlsaeError(f"{path}: not found (run the aggregate stage first)")
    L = len(store.layers)
    stats, notes = latent_columns(pl.read_parquet(path), L)
    selected = select_latents(stats, p.latents)
    by_id = {r["latent"]: r for r in stats.filter(pl.col("latent").is_in(selected.tolist())).iter_rows(named=True)}
    found = scan(store, selected, p, progress)
    w_dec = sae.W_dec.detach().cpu()
    top, topv, bot, botv = decoder_logit_lens(
        w_dec, final_norm, w_u.detach().cpu(), selected, p.logit_tokens, vocab_size
    )
    active = stats.filter(pl.col("count") > 0)["latent"].to_numpy()
    nn_ids, nn_cos = nearest_latents(w_dec, selected, active, p.neighbours)
    shown: set[int] = set()
    records = []
    for slot, f in enumerate(selected.tolist()):
        row = by_id[f]
        ctx = []
        for rank, c in enumerate(found["contexts"][slot]):
            toks = store.tokens[c["first"] : c["stop"]].tolist()
            shown.update(toks)
            ctx.append(
                {
                    "tokens": toks,
                    "peak": c["peak"] - c["first"],
                    "value": _r(c["value"]),
                    "layer": c["layer"],
                    "heat": [[r, l_, _r(v, 3)] for r, l_, v in found["heat"][(slot, rank)]],
                }
            )
        shown.update(top[slot].tolist() + bot[slot].tolist())
        records.append(
            {
                "id": f,
                "count": row["count"],
                "mu": _r(row["mean_layer"]),
                "sigma": _r(row["std_layer"]),
                "within": _r(row["within_share"]),
                "eff": _r(row["effective_layers"]),
                "dist": [_r(x, 3) for x in (row["layer_dist"] or [0.0] * L)],
                "hist": {"max": _r(float(found["max"][slot])), "counts": found["hist"][slot].tolist()},
                "top": [[int(t), _r(float(v), 3)] for t, v in zip(top[slot], topv[slot])],
                "bottom": [[int(t), _r(float(v), 3)] for t, v in zip(bot[slot], botv[slot])],
                "nn": [[int(g), _r(float(c), 3)] for g, c in zip(nn_ids[slot], nn_cos[slot])],
                "ctx": ctx,
            }
        )
    prompt_rows = prompts(store, p)
    for pr in prompt_rows:
        shown.update(pr["tokens"])
    return {
        "meta": {
            "model": model,
            "lens": getattr(sae.cfg, "lens", "none"),
            "layers": store.layers,
            "n_latents": store.n_latents,
            "k": store.k,
            "n_tokens": store.n_tokens,
            "n_active": int((stats["count"] > 0).sum()),
            "columns": notes,
            "params": p.model_dump(),
        },
        "vocab": {str(t): decode(t) for t in sorted(shown)},
        "latents": records,
        "prompts": prompt_rows,
    }
