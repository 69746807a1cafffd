"""check: validate every param before any stage runs; write the corpus manifest extract depends on."""

import typer

from mlsae.check import check
from mlsae.core import paths as C
from mlsae.core.stage import stage


def main(params_file: str = "params.yaml") -> None:
    with stage("check"):
        check(params_file, C.CORPUS_MANIFEST, record=True)


if __name__ == "__main__":
    typer.run(main)
