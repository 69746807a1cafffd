"""The run summary: one row per run (it stacks across experiments in `mlsae compare`) and its
one-screen text, with the variance verdict."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from mlsae.stats.estimate import bias_flag

if TYPE_CHECKING:
    from mlsae.core.metrics import Figures

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
    "eval_documents": "eval documents: the resampling unit of every interval",
    "fvu": "fraction of variance unexplained, eval split, mean over layers (bias-corrected)",
    "fvu_ci": "95% interval of fvu (resampling eval documents; docs/statistics.md)",
    "delta_ce": "CE increase when one layer is spliced with its reconstruction (nats/token)",
    "delta_ce_ci": "95% interval of delta_ce",
    "delta_ce_mean": "CE increase when one layer is replaced by its eval mean (mean ablation, the baseline stage)",
    "loss_recovered": "1 - delta_ce / delta_ce_mean: the fraction of the mean-ablation loss recovered",
    "loss_recovered_ci": "95% interval of loss_recovered",
    "kl": "KL(clean || spliced) per token (nats)",
    "ce_clean": "clean next-token CE (nats/token)",
    "l0": "active latents per vector, eval",
    "dead_fraction": "latents never active on the eval split",
    "n_latents_counted": "latents in K: active on >= analysis.min_count tokens in >= analysis.min_documents documents",
    "within_share": "equal token weighting: mean within-token layer variance / mean total over K (bias-corrected)",
    "within_share_ci": "95% interval of within_share",
    "var_ratio": "var_total / var_within, equal token weighting",
    "within_share_mass": "the same share with activation-mass token weights",
    "within_share_mass_ci": "95% interval of within_share_mass",
    "within_share_peak": "the same share with peak-activation token weights",
    "within_share_peak_ci": "95% interval of within_share_peak",
    "within_share_pooled": "sum_K n_f within_f / sum_K n_f total_f (firings pooled)",
    "within_share_any_docs": "within_share over latents with min_count tokens in any number of documents (no valid interval)",
    "var_ratio_paper": "the seed paper's estimator per 2,048-token batch (not a variance; docs/statistics.md); the paper reports about 100",
    "var_ratio_paper_ci": "95% interval of var_ratio_paper",
    "var_within_norm": "var_within / (L-1)^2 (depth-normalised)",
    "var_total_norm": "var_total / (L-1)^2 (depth-normalised)",
    "effective_layers": "mean over active (token, latent) pairs of exp(entropy of p_tf)",
    "effective_layers_ci": "95% interval of effective_layers",
    "effective_layers_depth": "(effective_layers - 1) / (L - 1): 0 for one layer per firing, 1 for every layer",
    "multi_layer_fraction": "active pairs whose second-largest layer share is >= analysis.multi_layer_threshold",
    "multi_layer_fraction_ci": "95% interval of multi_layer_fraction",
    "mean_layer_std": "mean std of the aggregate layer distributions over K (layers)",
    "bias_flags": "figures whose bias correction exceeds a quarter of their standard error",
    "auxk_steps": "training steps whose AuxK term acted (some latent dead)",
    "train_dead_fraction": "latents dead (by sae.dead_tokens) at the end of training",
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


def summary_row(metrics: Mapping[str, Figures], config: Mapping[str, Any]) -> dict[str, Any]:
    """The one-row run summary (keys and order: :data:`SUMMARY_COLUMNS`).

    Args:
        metrics: metrics by stage, keyed by the metrics file's stem (``extract``, ``lens``,
            ``train``, ``eval``, ``analysis``); a missing stage or key gives ``None``.
        config: the run's settings: ``model``, ``lens``, ``k``, ``layers`` (a list of blocks or a
            string such as ``"all"``), and optionally ``n_latents``, ``d_model``, ``expansion``.

    Returns:
        A flat dict of scalars (numbers, strings or ``None``), the same for one run's report and
        for :mod:`mlsae.compare.experiments`'s rows.
    """

    def get(stage: str, key: str) -> Any:
        return _number((metrics.get(stage) or {}).get(key))

    def ci(stage: str, key: str) -> str | None:
        return format_interval((metrics.get(stage) or {}).get(f"{key}_ci"))

    d_model = _number(config.get("d_model")) or get("extract", "d_model")
    n_latents = _number(config.get("n_latents")) or get("train", "n_latents")
    expansion = _number(config.get("expansion"))
    if n_latents is None and d_model is not None and expansion is not None:
        n_latents = int(d_model * expansion)
    lens = config.get("lens")
    if lens is None:
        lens = (metrics.get("lens") or {}).get("lens")
    eff, n_layers = get("analysis", "effective_layers"), get("analysis", "n_layers")
    flagged = [
        f"{stage}.{key}"
        for stage, keys in (("eval", ("fvu", "delta_ce", "loss_recovered")), ("analysis", FLAGGED))
        for key in keys
        if bias_flag(metrics.get(stage) or {}, key)
    ]
    return {
        "model": None if config.get("model") is None else str(config.get("model")),
        "n_layers": get("extract", "n_layers"),
        "layers": format_layers(config.get("layers")),
        "d_model": d_model,
        "n_latents": n_latents,
        "k": _number(config.get("k")),
        "lens": None if lens is None else str(lens),
        "eval_documents": get("extract", "eval_documents"),
        "fvu": get("eval", "fvu"),
        "fvu_ci": ci("eval", "fvu"),
        "delta_ce": get("eval", "delta_ce"),
        "delta_ce_ci": ci("eval", "delta_ce"),
        "delta_ce_mean": get("baseline", "delta_ce_mean"),
        "loss_recovered": get("eval", "loss_recovered"),
        "loss_recovered_ci": ci("eval", "loss_recovered"),
        "kl": get("eval", "kl"),
        "ce_clean": get("eval", "ce_clean"),
        "l0": get("eval", "l0"),
        "dead_fraction": get("eval", "dead_fraction"),
        "n_latents_counted": get("analysis", "n_latents_counted"),
        "within_share": get("analysis", "within_share"),
        "within_share_ci": ci("analysis", "within_share"),
        "var_ratio": get("analysis", "var_ratio"),
        "within_share_mass": get("analysis", "within_share_mass"),
        "within_share_mass_ci": ci("analysis", "within_share_mass"),
        "within_share_peak": get("analysis", "within_share_peak"),
        "within_share_peak_ci": ci("analysis", "within_share_peak"),
        "within_share_pooled": get("analysis", "within_share_pooled"),
        "within_share_any_docs": get("analysis", "within_share_any_docs"),
        "var_ratio_paper": get("analysis", "var_ratio_paper"),
        "var_ratio_paper_ci": ci("analysis", "var_ratio_paper"),
        "var_within_norm": get("analysis", "var_within_norm"),
        "var_total_norm": get("analysis", "var_total_norm"),
        "effective_layers": eff,
        "effective_layers_ci": ci("analysis", "effective_layers"),
        "effective_layers_depth": depth_normalised(eff, n_layers),
        "multi_layer_fraction": get("analysis", "multi_layer_fraction"),
        "multi_layer_fraction_ci": ci("analysis", "multi_layer_fraction"),
        "mean_layer_std": get("analysis", "mean_layer_std"),
        "bias_flags": ", ".join(flagged) or None,
        "auxk_steps": get("train", "auxk_steps"),
        "train_dead_fraction": get("train", "dead_fraction"),
        "adjacent_cos": get("extract", "adjacent_cos"),
    }


FLAGGED = (
    "within_share",
    "within_share_mass",
    "within_share_peak",
    "effective_layers",
    "multi_layer_fraction",
    "var_ratio_paper",
)
"""Analysis figures whose bias correction the summary flags when large (`bias_flags`)."""


def depth_normalised(effective_layers: float | None, n_layers: float | None) -> float | None:
    """``(effective_layers - 1) / (L - 1)``: the spread over layers per unit of the possible spread,
    0 for a firing at one layer and 1 for one spread evenly over all ``L`` (``effective_layers / L``
    would have a floor of ``1 / L``, which favours the shallower model); None for one layer."""
    if effective_layers is None or n_layers is None or n_layers < 2:
        return None
    return (effective_layers - 1) / (n_layers - 1)


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


def format_interval(value: Any, digits: int = 3) -> str | None:
    """A ``[lo, hi]`` interval as text ``"lo-hi"`` (None when absent or not two numbers)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    lo, hi = (_number(v) for v in value)
    if lo is None or hi is None:
        return None
    return f"{lo:.{digits}g}–{hi:.{digits}g}"


def variance_verdict(summary: Mapping[str, Any]) -> str:
    """Plain-language sentences on within-token vs across-token layer variance, like with like:
    the seed paper's estimator (per 2,048-token batch, as the seed computes it) against its "about
    two orders of magnitude", and the consistent decomposition (docs/statistics.md) beside it."""
    share = _number(summary.get("within_share"))
    share_m = _number(summary.get("within_share_mass"))
    paper = _number(summary.get("var_ratio_paper"))
    if share is None or paper is None:
        return "Layer variance decomposition: undefined (no latent was active often enough to count)."
    paper_ci = summary.get("var_ratio_paper_ci") or "-"
    orders = math.log10(paper) if paper > 0 else float("-inf")
    if orders >= 1.5:
        size = f"{orders:.1f} orders of magnitude, close to the paper's about two"
    elif orders >= 0.5:
        size = f"{orders:.1f} orders of magnitude, short of the paper's about two"
    else:
        size = "less than one order of magnitude, unlike the paper's about two"
    return (
        f"The paper's estimator gives {paper:.3g} ({paper_ci}): {size}. Measured as a variance "
        f"decomposition, the within-token share of a latent's layer variance is {share:.3g} "
        f"({summary.get('within_share_ci') or '-'}) weighting tokens equally and "
        f"{format_value(share_m, 3)} ({summary.get('within_share_mass_ci') or '-'}) weighting them by "
        "activation mass: the smaller the share, the more a latent's layer changes from token to token."
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
        f"reconstruction  FVU {format_value(s.get('fvu'))} ({s.get('fvu_ci') or '-'})   L0 {format_value(s.get('l0'))}   "
        f"dead on eval {format_value(_percent(s.get('dead_fraction')))}%   AuxK steps {format_value(s.get('auxk_steps'))}",
        f"downstream      delta CE {format_value(s.get('delta_ce'))} ({s.get('delta_ce_ci') or '-'}) nats/token; "
        f"mean ablation {format_value(s.get('delta_ce_mean'))}; loss recovered {format_value(s.get('loss_recovered'))} "
        f"({s.get('loss_recovered_ci') or '-'})   KL {format_value(s.get('kl'))}",
        f"layer variance  within-token share {format_value(s.get('within_share'))} ({s.get('within_share_ci') or '-'}), "
        f"mass-weighted {format_value(s.get('within_share_mass'))}, peak-weighted "
        f"{format_value(s.get('within_share_peak'))}; paper's ratio {format_value(s.get('var_ratio_paper'))}; "
        f"{format_value(s.get('n_latents_counted'))} latents counted",
        f"multi-layer     {format_value(_percent(s.get('multi_layer_fraction')))}% of active pairs have a second layer "
        f"share >= threshold; {format_value(s.get('effective_layers'))} effective layers per pair",
        f"residual stream adjacent-block cosine {format_value(s.get('adjacent_cos'))}",
        f"intervals       95 %, over {format_value(s.get('eval_documents'))} eval documents; values bias-corrected; "
        f"correction above a quarter SE: {s.get('bias_flags') or 'none'}",
        "",
        variance_verdict(s),
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
