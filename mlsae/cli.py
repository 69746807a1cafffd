"""The `mlsae` command: tools around the pipeline (the stages themselves run from dvc.yaml)."""

import typer

from mlsae import compare as _compare

app = typer.Typer(help="mlsae: multi-layer SAEs over a language model's residual stream.", no_args_is_help=True)
app.command("compare", help="Stack the summary rows of every DVC experiment into reports/tables/experiments.md.")(
    _compare.main
)


@app.command("models")
def models() -> None:
    """List the registry's model names (any hub id, local HF dir or .gguf path works too)."""
    from mlsae.models import REGISTRY

    for name, target in sorted(REGISTRY.items()):
        print(f"{name:24} {target}")


if __name__ == "__main__":
    app()
