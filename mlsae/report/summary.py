"""The run summary: one row per run (it stacks across experiments in `mlsae compare`) and its
one-screen text, with the variance verdict."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


# --------------------------------------------------------------------------------------------
# The summary row
# --------------------------------------------------------------------------------------------

SUMMARY_COLUMNS: dict[str, str] = {
    "model": "model name",
    "n_layers": "transformer blocks in the model",
    "layers": "blocks the SAE is trained on",
    "d_model": "residual width",
    "n_latents": "SAE latents",
    "k": "active latents per vector (TopK)",
    "lens": "space the SAE works in (none = model basis)",
    "fvu": "fraction of variance unexplained, eval split, mean over layers",
    "delta_ce": "CE increase when one layer is spliced with its reconstruction (nats/token)",
    "delta_ce_zero": "CE increase when one layer is zero-ablated (nats/token), for scale",
    "kl": "KL(clean || spliced) per token (nats)",
    "ce_clean": "clean next-token CE (nats/token)",
    "l0": "active latents per vector, eval",
    "dead_fraction": "latents never active on the eval split",
    "var_token": "mean per-token variance of a latent's layer distribution",
    "var_aggregate": "mean variance of a latent's aggregate layer distribution",
    "var_ratio": "var_aggregate / var_token (seed paper: about 100)",
    "var_ratio_weighted": "the same ratio with activation-mass weights",
    "multi_layer_fraction": "active (token, latent) pairs active at more than one layer",
    "mean_layer_std": "mean std of the aggregate layer distributions (layers)",
    "adjacent_cos": "mean cosine similarity of adjacent blocks' centred residuals",
}
"""The run summary's columns, in order, with a one-line meaning each."""


def format_layers(layers: Any) -> str:
    """Block indices as a short string: ``[0, 1, 2, 3, 5]`` -> ``"0-3,5"``; ``"all"`` stays ``"all"``."""
    if layers is None:
        return ""
    if isinstance(layers, str):
        return layers
    if isinstance(layers, (int, np.integer)):
        return str(int(layers))
    values = [int(v) for v in layers]
    parts: list[str] = []
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and values[stop + 1] == values[stop] + 1:
            stop += 1
        if stop - start >= 2:
            parts.append(f"{values[start]}-{values[stop]}")
        else:
            parts.extend(str(v) for v in values[start : stop + 1])
        start = stop + 1
    return ",".join(parts)


def _number(value: Any) -> float | int | None:
    """A finite number as itself, anything else (None, NaN, a string, a bool) as None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    return float(value) if math.isfinite(value) else None


def summary_row(metrics: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any]) -> dict[str, Any]:
    """The one-row run summary (keys and order: :data:`SUMMARY_COLUMNS`).

    Args:
        metrics: metrics by stage, keyed by the metrics file's stem (``extract``, ``lens``,
            ``train``, ``eval``, ``analysis``); a missing stage or key gives ``None``.
        config: the run's settings: ``model``, ``lens``, ``k``, ``layers`` (a list of blocks or a
            string such as ``"all"``), and optionally ``n_latents``, ``d_model``, ``expansion``.

    Returns:
        A flat dict of scalars (numbers, strings or ``None``), the same for one run's report and
        for :mod:`mlsae.compare`'s rows.
    """

    def get(stage: str, key: str) -> Any:
        return _number((metrics.get(stage) or {}).get(key))

    d_model = _number(config.get("d_model")) or get("extract", "d_model")
    n_latents = _number(config.get("n_latents")) or get("train", "n_latents")
    expansion = _number(config.get("expansion"))
    if n_latents is None and d_model is not None and expansion is not None:
        n_latents = int(d_model * expansion)
    lens = config.get("lens")
    if lens is None:
        lens = (metrics.get("lens") or {}).get("lens")
    return {
        "model": None if config.get("model") is None else str(config.get("model")),
        "n_layers": get("extract", "n_layers"),
        "layers": format_layers(config.get("layers")),
        "d_model": d_model,
        "n_latents": n_latents,
        "k": _number(config.get("k")),
        "lens": None if lens is None else str(lens),
        "fvu": get("eval", "fvu"),
        "delta_ce": get("eval", "delta_ce"),
        "delta_ce_zero": get("eval", "delta_ce_zero"),
        "kl": get("eval", "kl"),
        "ce_clean": get("eval", "ce_clean"),
        "l0": get("eval", "l0"),
        "dead_fraction": get("eval", "dead_fraction"),
        "var_token": get("analysis", "var_token"),
        "var_aggregate": get("analysis", "var_aggregate"),
        "var_ratio": get("analysis", "var_ratio"),
        "var_ratio_weighted": get("analysis", "var_ratio_weighted"),
        "multi_layer_fraction": get("analysis", "multi_layer_fraction"),
        "mean_layer_std": get("analysis", "mean_layer_std"),
        "adjacent_cos": get("extract", "adjacent_cos"),
    }


# --------------------------------------------------------------------------------------------
# The text summary
# --------------------------------------------------------------------------------------------


def format_value(value: Any, digits: int = 4) -> str:
    """A table cell: ``-`` for missing, integers as they are, floats to ``digits`` significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}g}"
    return str(value)


def variance_verdict(var_token: float | None, var_aggregate: float | None) -> str:
    """One plain-language sentence comparing per-token and aggregate layer variance."""
    if var_token is None or var_aggregate is None:
        return "Per-token vs aggregate layer variance: undefined (no latent was active often enough to count)."
    if var_token <= 0:
        if var_aggregate > 0:
            return (
                "Every latent fires at a single layer per token (per-token variance 0) while its aggregate "
                "distribution spreads over layers: the paper's finding in its extreme form."
            )
        return "Both variances are 0: every latent is confined to one layer, per token and in aggregate."
    ratio = var_aggregate / var_token
    if ratio <= 1:
        return (
            f"Per-token layer variance is NOT below the aggregate variance (ratio {ratio:.3g}): "
            "unlike the seed paper (about two orders of magnitude)."
        )
    orders = math.log10(ratio)
    if orders >= 1.5:
        return (
            f"Per-token layer variance is {ratio:.3g}x ({orders:.1f} orders of magnitude) below the aggregate: "
            "consistent with the seed paper (about two orders of magnitude); a latent is active at one or two "
            "adjacent layers per token, but at different layers for different tokens."
        )
    if orders >= 0.5:
        return (
            f"Per-token layer variance is {ratio:.3g}x ({orders:.1f} orders of magnitude) below the aggregate: "
            "the same direction as the seed paper, but weaker than its about two orders of magnitude."
        )
    return (
        f"Per-token layer variance is only {ratio:.3g}x below the aggregate: much of a latent's spread over "
        "layers happens within single tokens, unlike the seed paper (about two orders of magnitude)."
    )


def summary_text(summary: Mapping[str, Any]) -> str:
    """A one-screen plain-text summary of a run (a :func:`summary_row` dict): headline figures and a verdict.

    Plain text without markup, so it can be logged or written anywhere; :func:`render_summary`
    prints it in a rich panel.
    """
    s = summary
    lines = [
        f"model {format_value(s.get('model'))}: {format_value(s.get('n_layers'))} blocks, d_model {format_value(s.get('d_model'))}; "
        f"SAE on blocks {format_value(s.get('layers'))}, {format_value(s.get('n_latents'))} latents, k {format_value(s.get('k'))}, "
        f"lens {format_value(s.get('lens'))}",
        f"reconstruction  FVU {format_value(s.get('fvu'))}   L0 {format_value(s.get('l0'))}   "
        f"dead {format_value(_percent(s.get('dead_fraction')))}%",
        f"downstream      delta CE {format_value(s.get('delta_ce'))} nats/token (zero-ablation {format_value(s.get('delta_ce_zero'))})"
        f"   KL {format_value(s.get('kl'))}",
        f"layer variance  per-token {format_value(s.get('var_token'))}   aggregate {format_value(s.get('var_aggregate'))}   "
        f"ratio {format_value(s.get('var_ratio'))}",
        f"multi-layer     {format_value(_percent(s.get('multi_layer_fraction')))}% of active (token, latent) pairs span "
        f">1 layer; mean sigma_f {format_value(s.get('mean_layer_std'))} layers",
        f"residual stream adjacent-block cosine {format_value(s.get('adjacent_cos'))}",
        "",
        variance_verdict(_number(s.get("var_token")), _number(s.get("var_aggregate"))),
    ]
    return "\n".join(lines)


def _percent(value: Any) -> float | None:
    number = _number(value)
    return None if number is None else 100.0 * number


def render_summary(text: str, console: Any = None) -> None:
    """Print :func:`summary_text`'s output in a rich panel (to ``console``, default stdout)."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

    (console or Console()).print(Panel(Text(text), title="MLSAE report", expand=False))
