"""The `mlsae` command: tools around the pipeline (the stages themselves run from dvc.yaml)."""

import typer

from mlsae.compare import experiments as _compare
from mlsae.compare import seeds as _seeds

app = typer.Typer(help="mlsae: multi-layer SAEs over a language model's residual stream.", no_args_is_help=True)
app.command(
    "compare",
    help="Stack the summary rows of every DVC experiment into reports/compare/experiments.md; with --run A "
    "--run B, compare models (and their training seeds) in reports/compare/models.md.",
)(_compare.main)


app.command("seeds", help="Experiments differing only in train.seed: spread over seeds beside the document interval.")(
    _seeds.main
)


@app.command("models")
def models() -> None:
    """List the registry's model names (any hub id, local HF dir or .gguf path works too)."""
    from mlsae.models.registry import REGISTRY

    for name, target in sorted(REGISTRY.items()):
        print(f"{name:24} {target}")


@app.command("export")
def export(
    out: str = typer.Argument(..., help="Folder to write (absent or empty, unless --force)."),
    format: str = typer.Option("saelens", "--format", help="Output layout; only saelens (SAELens >= 6)."),
    sae: str = typer.Option("data/sae", "--sae", help="The SAE directory to export."),
    model_name: str = typer.Option("", "--model-name", help="metadata.model_name (default: the SAE's model)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT when an earlier `mlsae export` wrote it."),
) -> None:
    """Export the SAE to SAELens: one folder per layer hook blocks.{i}.hook_resid_post."""
    from mlsae.core.stage import stage
    from mlsae.sae.saelens import export_note, export_saelens

    with stage("export"):
        if format != "saelens":
            from mlsae.core.errors import MlsaeError

            raise MlsaeError(f"--format: unknown format {format!r}; use saelens")
        folders = export_saelens(sae, out, model_name=model_name, force=force)
        print(f"wrote {len(folders)} SAELens folder(s) under {out} (weights hardlinked to one file)")
        note = export_note(sae)
        if note:
            print(note)


if __name__ == "__main__":
    app()
