"""STALE-LOCK CHECK (issue 16): the committed results must come from the committed code.

Every `.py` dependency that `dvc.lock` records must have the md5 `dvc.lock` records for it (DVC's
file hash: md5 of the file's bytes). When this fails, the committed `dvc.lock` and `reports/`
were produced by other code: rerun the default pipeline (`dvc repro`) and commit `dvc.lock`,
`reports/` and the README figures together with the code change.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_stale_lock_every_code_dep_hash_matches_the_file():
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    stale = []
    for name, stage in lock["stages"].items():
        for dep in stage.get("deps", []):
            if not dep["path"].endswith(".py"):
                continue
            path = ROOT / dep["path"]
            now = hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else "missing"
            if now != dep["md5"]:
                stale.append(f"{name}: {dep['path']}")
    assert not stale, "dvc.lock is stale (rerun `dvc repro` and commit dvc.lock + reports/): " + ", ".join(stale)
