"""browse: the static latent browser -> reports/browser/index.html."""

import typer

from mlsae.browse import build_browser
from mlsae.core import paths as C
from mlsae.core.stage import params, stage
from mlsae.stores.activations import guard


def main(params_file: str = "params.yaml") -> None:
    with stage("browse"), guard(C.LATENTS, "dump"):
        p = params(params_file)
        out = build_browser(p.model, C.LATENTS, C.ANALYSIS_DIR, C.SAE_DIR, C.BROWSER_DIR, p.browse, progress=True)
        print(
            f"browse: {out['path']} ({out['bytes'] / 1e6:.1f} MB, {out['latents']} latents, {out['prompts']} prompts)"
        )


if __name__ == "__main__":
    typer.run(main)
