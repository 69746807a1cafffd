"""Headless Debian ``chromium`` driven by Playwright (the screenshot command and the tests).

Playwright's own browser downloads are never used: ``launch`` starts the system browser
(``MLSAE_CHROMIUM`` or ``/usr/bin/chromium``, installed by ``make setup`` with apt-get) with
networking services off, so a page that tries to reach the network fails visibly instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from mlsae.core.errors import MlsaeError

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def executable() -> str | None:
    """The chromium binary to drive, or None when there is none."""
    path = os.environ.get("MLSAE_CHROMIUM") or "/usr/bin/chromium"
    return path if Path(path).is_file() else shutil.which("chromium")


def launch(playwright: Any) -> Any:
    """A Playwright ``Browser`` running the system chromium."""
    exe = executable()
    if exe is None:
        raise MlsaeError(
            "chromium not found: install it (apt-get install chromium, or `make setup`) "
            "or set MLSAE_CHROMIUM to its path"
        )
    return playwright.chromium.launch(executable_path=exe, args=ARGS, headless=True)


def screenshot(
    page_path: str | Path, out: str | Path, fragment: str = "", width: int = 1280, height: int = 900
) -> Path:
    """Render ``page_path`` (a local HTML file) headless and save a PNG of the viewport to ``out``."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise MlsaeError("the playwright package is missing: pip install -e '.[test]'") from None
    page_path = Path(page_path).resolve()
    if not page_path.is_file():
        raise MlsaeError(f"{page_path}: not found (run the browse stage first)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(page_path.as_uri() + fragment)
            page.wait_for_load_state("load")
            page.screenshot(path=str(out))
        finally:
            browser.close()
    return out
