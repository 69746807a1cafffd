"""The report's figures (PNG bytes, rendered in memory) and their series."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mlsae.report.inputs import _Inputs
from mlsae.report.summary import _number

# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _block_ticks(ax: Axes, positions: Sequence[float], labels: Sequence[int], axis: str = "x") -> None:
    """At most ~16 block labels, evenly spaced, so 30+ layers stay legible."""
    step = max(1, math.ceil(len(positions) / 16))
    pos, lab = list(positions)[::step], [str(b) for b in list(labels)[::step]]
    if axis == "x":
        ax.set_xticks(pos, lab)
    else:
        ax.set_yticks(pos, lab)


def _counted(inp: _Inputs, min_count: int) -> pl.DataFrame:
    """Latents active at >= min_count tokens, sorted by mu_f (then id)."""
    return inp.latents.filter((pl.col("count") >= max(min_count, 1)) & pl.col("mean_layer").is_not_null()).sort(
        ["mean_layer", "latent"]
    )


def _heatmap(inp: _Inputs, min_count: int, max_rows: int) -> bytes:
    """P_f over layers, one row per latent (sorted by mu_f), evenly subsampled to at most ``max_rows``."""
    counted = _counted(inp, min_count)
    fig = Figure(figsize=(8, 7), layout="constrained")
    ax = fig.add_subplot()
    n = counted.height
    if n == 0:
        _empty(ax, f"no latent active at >= {min_count} tokens")
    else:
        rows = np.unique(np.linspace(0, n - 1, min(n, max_rows)).round().astype(np.int64))
        matrix = np.asarray(counted["layer_dist"].gather(rows).to_list(), dtype=np.float64)
        # Scale to the bulk of the values (not to 1) so that spread-out latents stay visible.
        vmax = max(float(np.quantile(matrix, 0.995)), 1.0 / len(inp.blocks))
        image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0, vmax=vmax)
        cbar = fig.colorbar(image, ax=ax, extend="max" if matrix.max() > vmax else "neither")
        cbar.set_label("P_f(layer): share of the latent's activation mass")
        _block_ticks(ax, range(len(inp.blocks)), inp.blocks)
        ax.set_xlabel("block")
        shown = f"all {n}" if rows.size == n else f"{rows.size} of {n}, evenly spaced"
        ax.set_ylabel(f"latent, sorted by mean layer μ_f ({shown})")
        ax.set_yticks([])
    ax.set_title(f"Layer distribution P_f of latents active at ≥ {min_count} tokens")
    return _png(fig)


@dataclass(frozen=True)
class _Histogram:
    counts: np.ndarray
    edges: np.ndarray

    def frame(self, name: str) -> pl.DataFrame:
        centres = (self.edges[:-1] + self.edges[1:]) / 2
        return pl.DataFrame(
            {
                name: centres,
                "count": self.counts.astype(np.int64),
                "bin_start": self.edges[:-1],
                "bin_end": self.edges[1:],
            }
        )


def _histograms(inp: _Inputs, min_count: int) -> tuple[_Histogram, _Histogram]:
    """Histograms of mu_f over [0, L-1] and of sigma_f over [0, a little past the largest sigma_f]."""
    counted = _counted(inp, min_count)
    top = len(inp.blocks) - 1
    bins = int(np.clip(4 * top, 10, 60))
    mean_range = (0.0, float(top)) if top > 0 else (-0.5, 0.5)
    stds = counted["std_layer"].cast(pl.Float64).to_numpy()
    # sigma_f is at most (L-1)/2; the range stops a little past the largest value (or the per-token
    # std, drawn as a reference line) so that the bars are not squeezed against the axis.
    var_within = _number(inp.analysis.var_within) or 0.0
    reach = max(float(stds.max()) if stds.size else 0.0, math.sqrt(max(var_within, 0.0)))
    std_range = (0.0, min(top / 2, 1.1 * reach) if top > 0 and reach > 0 else max(top / 2, 0.5))
    mean = np.histogram(counted["mean_layer"].cast(pl.Float64).to_numpy(), bins=bins, range=mean_range)
    std = np.histogram(stds, bins=bins, range=std_range)
    return _Histogram(*mean), _Histogram(*std)


def _histogram_figure(inp: _Inputs, mean: _Histogram, std: _Histogram, min_count: int) -> bytes:
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.stairs(mean.counts, mean.edges, fill=True, color="tab:blue", alpha=0.8)
    left.set_xlabel(f"mean layer μ_f (layer position 0..{len(inp.blocks) - 1})")
    left.set_ylabel("latents")
    left.set_title("Where latents live: μ_f")
    right.stairs(std.counts, std.edges, fill=True, color="tab:orange", alpha=0.8)
    var_within = _number(inp.analysis.var_within)
    mean_std = _number(inp.analysis.mean_layer_std)
    if mean_std is not None:
        right.axvline(mean_std, color="k", linestyle="-", label=f"mean σ_f = {mean_std:.3g}")
    if var_within is not None and var_within >= 0:
        right.axvline(
            math.sqrt(var_within),
            color="tab:red",
            linestyle="--",
            label=f"√var_within = {math.sqrt(var_within):.3g} (within one token)",
        )
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    right.set_xlabel("std of layer distribution σ_f (layers)")
    right.set_ylabel("latents")
    right.set_title("How spread out: σ_f")
    fig.suptitle(f"Aggregate layer distributions of {int(mean.counts.sum())} latents active at ≥ {min_count} tokens")
    return _png(fig)


def _eval_figure(layers: pl.DataFrame) -> bytes:
    """FVU (eval, and train where known) and delta CE / KL by block, two panels."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    blocks = layers["block"].to_list()
    left.plot(blocks, layers["fvu"].to_list(), marker="o", label="eval")
    if layers["fvu_train"].null_count() < layers.height:
        left.plot(blocks, layers["fvu_train"].to_list(), marker=".", linestyle="--", label="train (last 10% of steps)")
    left.set_xlabel("block")
    left.set_ylabel("FVU (fraction of variance unexplained)")
    left.set_title("Reconstruction error by layer")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    right.plot(blocks, layers["delta_ce"].to_list(), marker="o", label="ΔCE (spliced − clean)")
    if layers["delta_ce_lo"].null_count() < layers.height:
        right.fill_between(
            blocks, layers["delta_ce_lo"].to_list(), layers["delta_ce_hi"].to_list(), alpha=0.2, label="95 % interval"
        )
    if layers["kl"].null_count() < layers.height:
        right.plot(blocks, layers["kl"].to_list(), marker="s", linestyle="--", label="KL(clean ‖ spliced)")
    right.set_xlabel("block")
    right.set_ylabel("nats per token")
    right.set_title("Downstream loss when one layer is reconstructed")
    right.axhline(0, color="0.6", linewidth=0.8)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _png(fig)


def _adjacent_figure(adjacent: Sequence[float | None]) -> bytes:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    if not adjacent:
        _empty(ax, "fewer than two blocks: no adjacent pairs")
    else:
        # matplotlib draws a None as a gap (it converts y to float, None to NaN); its ArrayLike stub omits None
        ax.plot(range(len(adjacent)), adjacent, marker="o")  # type: ignore[arg-type]
        ax.set_xlabel("block i")
        ax.set_ylabel("cosine similarity, blocks i and i+1")
        ax.grid(alpha=0.3)
    ax.set_title("Residual stream: adjacent-block cosine similarity (centred, eval)")
    return _png(fig)


def _smooth(values: np.ndarray) -> np.ndarray:
    """A centred running mean over ~2% of the steps (at least 1), ignoring NaN."""
    window = max(1, len(values) // 50)
    if window == 1:
        return values
    kernel = np.ones(window)
    finite = np.isfinite(values)
    total = np.convolve(np.where(finite, values, 0.0), kernel, mode="same")
    count = np.convolve(finite.astype(np.float64), kernel, mode="same")
    return np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)


def _train_figure(curve: pl.DataFrame) -> bytes:
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    if curve.height == 0:
        _empty(left, "no training steps recorded")
        _empty(right, "no training steps recorded")
    else:
        step = curve["step"].cast(pl.Float64).to_numpy()
        series = [("loss", "total loss"), ("fvu", "FVU (mean over layers)"), ("auxk", "AuxK loss")]
        positive = []
        for (name, label), color in zip(series, ("tab:blue", "tab:orange", "tab:green")):
            if name not in curve.columns:
                continue
            values = curve[name].cast(pl.Float64).to_numpy()
            left.plot(step, values, color=color, alpha=0.25, linewidth=0.8)
            left.plot(step, _smooth(values), color=color, label=label)
            positive.append(values[np.isfinite(values)])
        finite = np.concatenate(positive) if positive else np.array([])
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
            left.set_yscale("log")
        left.set_xlabel("optimiser step")
        left.set_ylabel("loss (normalised space)")
        left.set_title("Training loss (faint: per step; solid: running mean)")
        left.legend(fontsize=8)
        dead = curve["dead_fraction"].cast(pl.Float64).to_numpy()
        right.plot(step, 100 * dead, color="tab:red")
        right.set_ylim(0, max(5.0, 110 * float(np.nanmax(dead)) if np.isfinite(dead).any() else 5.0))
        right.set_xlabel("optimiser step")
        right.set_ylabel("dead latents (%)")
        right.set_title("Dead latents")
        for ax in (left, right):
            ax.grid(alpha=0.3)
    return _png(fig)


def _lens_figure(frame: pl.DataFrame, lens: str) -> bytes:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(frame["layer"].to_list(), frame["kl_logit_lens"].to_list(), marker="o", label="logit lens")
    ax.plot(frame["layer"].to_list(), frame["kl_tuned_lens"].to_list(), marker="s", label=f"tuned lens ({lens})")
    ax.set_xlabel("block")
    ax.set_ylabel("KL(final ‖ lens prediction), nats per token")
    ax.set_title("Lens quality by layer")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)
