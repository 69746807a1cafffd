"""``python -m mlsae.browse.screenshot [INDEX] OUT.png [--fragment '#/latent/12']``: a PNG of the
latent browser rendered in headless chromium (the README's picture comes from this)."""

from __future__ import annotations

import typer

from mlsae.browse.chromium import screenshot
from mlsae.core import paths as C
from mlsae.core.stage import stage


def main(
    out: str,
    index: str = str(C.BROWSER_DIR / C.BROWSER_INDEX),
    fragment: str = "",
    width: int = 1280,
    height: int = 900,
) -> None:
    with stage("screenshot"):
        print(screenshot(index, out, fragment=fragment, width=width, height=height))


if __name__ == "__main__":
    typer.run(main)
