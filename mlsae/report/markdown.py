"""Tables as Markdown + CSV: the per-layer and top-latent tables, token contexts and sparklines,
and Markdown escaping."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl

from mlsae.core.errors import MlsaeError
from mlsae.report.inputs import _Inputs, _read_parquet, _series
from mlsae.report.summary import SUMMARY_COLUMNS, _number, format_layers, format_value

# --------------------------------------------------------------------------------------------
# Token contexts and sparklines
# --------------------------------------------------------------------------------------------

_SPARK = "▁▂▃▄▅▆▇█"


def layer_sparkline(dist: Sequence[float] | None) -> str:
    """A layer distribution as one character per layer, scaled to its maximum; ``·`` marks 0."""
    if dist is None or len(dist) == 0:
        return ""
    values = np.nan_to_num(np.asarray(dist, dtype=np.float64))
    top = values.max()
    if top <= 0:
        return "·" * values.size
    levels = np.clip(np.ceil(values / top * len(_SPARK)).astype(int) - 1, 0, len(_SPARK) - 1)
    return "".join("·" if v <= 0 else _SPARK[level] for v, level in zip(values, levels))


def token_context(
    index: int,
    tokens: np.ndarray,
    context: np.ndarray,
    position: np.ndarray,
    decode: Callable[[list[int]], str],
    before: int = 12,
    after: int = 4,
) -> str:
    """The text around eval token ``index``, with that token marked ``«like this»``.

    The window holds up to ``before`` tokens before and ``after`` tokens after ``index``, taken
    from the same context only (same ``context`` id and consecutive ``position``). The text is
    decoded in one piece and split at the token, so tokenizers that drop a leading space when
    decoding a lone token still read naturally; a leading space of the marked token is put
    before the mark. The result is raw text: callers escape it for their format.
    """
    n = len(tokens)
    if not 0 <= index < n:
        raise MlsaeError(f"token index {index} outside the {n} eval tokens")
    context_id, pos = context[index], int(position[index])
    lo = index
    while (
        lo > max(0, index - before)
        and context[lo - 1] == context_id
        and int(position[lo - 1]) == pos - (index - lo + 1)
    ):
        lo -= 1
    hi = index
    while (
        hi < min(n - 1, index + after)
        and context[hi + 1] == context_id
        and int(position[hi + 1]) == pos + (hi + 1 - index)
    ):
        hi += 1
    ids = [int(t) for t in tokens[lo : hi + 1]]
    cut = index - lo
    head = decode(ids[:cut]) if cut else ""
    through = decode(ids[: cut + 1])
    full = decode(ids)
    token = through[len(head) :] if through.startswith(head) else decode([ids[cut]])
    tail = full[len(through) :] if full.startswith(through) else decode(ids[cut + 1 :]) if cut + 1 < len(ids) else ""
    stripped = token.lstrip()
    if stripped:
        head, token = head + token[: len(token) - len(stripped)], stripped
    return f"{head}«{token}»{tail}"


def _one_line(text: str) -> str:
    """Newlines, carriage returns and tabs as visible symbols, so a context stays on one line."""
    return text.replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "⏎").replace("\t", "⇥")


_MD_SPECIAL = "\\`*_[]<>|~"


def _md_escape(text: str, full: bool = True) -> str:
    """Text safe inside a Markdown (GFM) table cell: one line, with ``|`` escaped.

    ``full`` also escapes the characters that Markdown or HTML would interpret (for free text such
    as token contexts); names and numbers only need the pipe escaped.
    """
    special = _MD_SPECIAL if full else "|"
    return "".join("\\" + c if c in special else c for c in _one_line(text))


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def markdown_table(frame: pl.DataFrame, raw: Sequence[str] = ()) -> str:
    """A GFM table of ``frame``: cells via :func:`format_value`, ``|`` escaped except in ``raw`` columns."""
    header = "| " + " | ".join(_md_escape(c, full=False) for c in frame.columns) + " |"
    align = "|" + "|".join("---" if frame.schema[c] == pl.String else "---:" for c in frame.columns) + "|"
    rows = []
    for row in frame.iter_rows():
        cells = []
        for name, value in zip(frame.columns, row):
            cell = format_value(value)
            cells.append(cell if name in raw or not isinstance(value, str) else _md_escape(cell, full=False))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([header, align, *rows]) + "\n"


def _csv(frame: pl.DataFrame) -> str:
    return frame.write_csv()


def _summary_markdown(row: Mapping[str, Any]) -> str:
    """The summary row as a field / value / meaning table (one row per field reads better than 20 columns)."""
    frame = pl.DataFrame(
        {
            "field": list(row),
            "value": [format_value(v) for v in row.values()],
            "meaning": [SUMMARY_COLUMNS.get(k, "") for k in row],
        }
    )
    return "# Run summary\n\n" + markdown_table(frame)


def _layers_table(inp: _Inputs) -> pl.DataFrame:
    """One row per SAE layer: eval metrics, training FVU, adjacent cosine, latent activity, lens KL."""
    n = len(inp.blocks)
    ev, path = inp.eval, inp.paths["eval"]
    adjacent = inp.extract.adjacent_cos_by_layer or []
    if not isinstance(adjacent, list):
        raise MlsaeError(f"{inp.paths['extract']}: 'adjacent_cos_by_layer' must be a list")
    mass = inp.layers["mass"].cast(pl.Float64).to_numpy()
    total = mass.sum()
    columns: dict[str, list[Any]] = {
        "layer": list(range(n)),
        "block": inp.blocks,
        "fvu": _series(ev, "fvu_by_layer", n, path, required=True),
        "fvu_train": _series(inp.train, "fvu_by_layer", n, inp.paths["train"]),
        "mse": _series(ev, "mse_by_layer", n, path),
        "l0": _series(ev, "l0_by_layer", n, path),
        "delta_ce": _series(ev, "delta_ce_by_layer", n, path, required=True),
        "delta_ce_lo": [ci[0] if ci else None for ci in _intervals(ev, "delta_ce_by_layer_ci", n)],
        "delta_ce_hi": [ci[1] if ci else None for ci in _intervals(ev, "delta_ce_by_layer_ci", n)],
        "delta_ce_mean": _layer_series(inp.baseline, "delta_ce_mean", inp.blocks, inp.paths["baseline"]),
        "loss_recovered": _series(ev, "loss_recovered_by_layer", n, path),
        "kl": _series(ev, "kl_by_layer", n, path),
        "adjacent_cos": [_number(adjacent[b]) if 0 <= b < len(adjacent) else None for b in inp.blocks],
        "n_latents_active": inp.layers["n_latents_active"].to_list(),
        "n_entries": inp.layers["n_entries"].to_list(),
        "mass_share": [float(m / total) if total > 0 else None for m in mass],
    }
    if inp.lens_by_layer is not None:
        for key in ("kl_logit_lens", "kl_tuned_lens"):
            columns[key] = inp.lens_by_layer[key].gather(inp.blocks).to_list()
    return pl.DataFrame(columns, strict=False)


def _intervals(data: Any, key: str, n: int) -> list[list[float] | None]:
    """The per-layer ``[lo, hi]`` list ``data[key]`` (all None when absent: no resampling)."""
    values = data.get(key)
    if not isinstance(values, list) or len(values) != n:
        return [None] * n
    return [v if isinstance(v, list) and len(v) == 2 and None not in v else None for v in values]


def _layer_series(baseline: Any, key: str, blocks: list[int], path: Path) -> list[float | None]:
    """The baseline stage's per-layer `key` at the SAE's `blocks` (it may cover more blocks)."""
    values, layers = baseline.get(f"{key}_by_layer"), baseline.get("layers")
    if not isinstance(values, list) or not isinstance(layers, list):
        return [None] * len(blocks)
    by_block = dict(zip(layers, values))
    if any(b not in by_block for b in blocks):
        raise MlsaeError(f"{path}: no {key} for some of the SAE's blocks {blocks}; rerun the baseline stage")
    return [_number(by_block[b]) for b in blocks]


@dataclass(frozen=True)
class _TopLatents:
    csv: pl.DataFrame
    markdown: str


def _top_latents_table(
    inp: _Inputs,
    tokens: np.ndarray,
    context: np.ndarray,
    position: np.ndarray,
    decode: Callable[[list[int]], str],
    top_latents: int,
    contexts_per_latent: int,
) -> _TopLatents:
    """The ``top_latents`` latents by activation mass with their distribution and top contexts."""
    total_mass = float(inp.latents["mass"].sum())
    top = inp.latents.filter(pl.col("count") > 0).sort(["mass", "latent"], descending=[True, False]).head(top_latents)
    ids = top["latent"].to_list()
    path = inp.paths["top_tokens"]
    contexts = _read_parquet(path, ("latent", "rank", "token", "value", "layer"), "aggregate")
    contexts = contexts.filter(pl.col("latent").is_in(ids) & (pl.col("rank") <= contexts_per_latent)).sort(
        ["latent", "rank"]
    )
    if contexts.height:
        # a non-empty integer column: its min and max are ints
        lo, hi = int(cast(int, contexts["token"].min())), int(cast(int, contexts["token"].max()))
        if lo < 0 or hi >= len(tokens):
            raise MlsaeError(f"{path}: token index {hi if hi >= 0 else lo} outside the {len(tokens)} eval tokens")
        bad = contexts.filter((pl.col("layer") < 0) | (pl.col("layer") >= len(inp.blocks)))
        if bad.height:
            raise MlsaeError(f"{path}: layer {bad['layer'][0]} outside 0..{len(inp.blocks) - 1}")
    by_latent: dict[int, list[tuple[float, int, str]]] = {}
    for latent, token, value, layer in contexts.select("latent", "token", "value", "layer").iter_rows():
        text = token_context(token, tokens, context, position, decode)
        by_latent.setdefault(latent, []).append((value, inp.blocks[layer], text))

    dists = top["layer_dist"].to_list()
    peaks = [inp.blocks[int(np.argmax(d))] if d else None for d in dists]
    base = pl.DataFrame(
        {
            "rank": list(range(1, top.height + 1)),
            "latent": ids,
            "mass": top["mass"].cast(pl.Float64),
            "mass_share": [m / total_mass if total_mass > 0 else None for m in top["mass"].cast(pl.Float64)],
            "count": top["count"],
            "mean_layer": top["mean_layer"].cast(pl.Float64),
            "std_layer": top["std_layer"].cast(pl.Float64),
            "entropy": top["entropy"].cast(pl.Float64),
            "n_layers_5pct": top["n_layers_5pct"],
            "peak_block": peaks,
            "layer_dist": [layer_sparkline(d) for d in dists],
        },
        strict=False,
    )

    def joined(latent: int, markdown: bool) -> str:
        items = by_latent.get(latent, [])
        if markdown:
            return "<br>".join(f"**{v:.3g}** @{b}: {_md_escape(t)}" for v, b, t in items)
        return "\n".join(f"{v:.4g} @{b}: {_one_line(t)}" for v, b, t in items)

    csv = base.with_columns(
        layer_p=pl.Series([" ".join(f"{p:.4f}" for p in d) if d else "" for d in dists]),
        contexts=pl.Series([joined(i, False) for i in ids], dtype=pl.String),
    )
    md_frame = base.rename({"mean_layer": "μ_f", "std_layer": "σ_f"}).with_columns(
        layer_dist=pl.Series([f"`{s}`" if s else "" for s in base["layer_dist"]], dtype=pl.String),
        contexts=pl.Series([joined(i, True) for i in ids], dtype=pl.String),
    )
    blocks = format_layers(inp.blocks)
    intro = (
        f"# Top {top.height} latents by activation mass\n\n"
        f"μ_f, σ_f: mean and std of the latent's aggregate layer distribution P_f, in layer positions "
        f"0..{len(inp.blocks) - 1} over the SAE's blocks {blocks}; entropy normalised to [0, 1]; "
        f"layer_dist: P_f per layer, one character per layer, scaled to its maximum (· = 0); "
        f"contexts: activation @block: text with the token «marked».\n\n"
    )
    return _TopLatents(csv, intro + markdown_table(md_frame, raw=("layer_dist", "contexts")))
