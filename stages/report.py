"""report: tables (Markdown + CSV), figures (PNG) and plot CSVs, then a one-screen summary."""

import typer

from mlsae.core import paths as C
from mlsae.core.stage import params, stage
from mlsae.models.registry import load_tokenizer
from mlsae.report import build_report, render_summary
from mlsae.stores.activations import guard
from mlsae.stores.latents import open_latents


def main(params_file: str = "params.yaml") -> None:
    with stage("report"), guard(C.LATENTS, "dump"):
        p = params(params_file)
        latents = open_latents(C.LATENTS)
        tokens, context, position = (latents.meta(k) for k in (C.TOKENS, C.CONTEXT, C.POSITION))
        tokenizer = load_tokenizer(p.model)
        out = build_report(
            C.METRICS_DIR,
            C.PLOTS_DIR,
            C.ANALYSIS_DIR,
            C.SAE_DIR / C.SAE_CONFIG,
            C.TABLES_DIR,
            C.FIGURES_DIR,
            tokens=tokens,
            context=context,
            position=position,
            decode=lambda ids: tokenizer.decode(ids),
            top_latents=p.analysis.top_latents,
            contexts_per_latent=p.analysis.top_tokens,
            min_count=p.analysis.min_count,
        )
        render_summary(out["text"])


if __name__ == "__main__":
    typer.run(main)
