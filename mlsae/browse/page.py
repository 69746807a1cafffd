"""The browser's single page: ``index.html`` with its data, script and style inline.

The payload (`mlsae.browse.data`) goes into ``<script type="application/json" id="data">`` as
JSON whose ``<``, ``>`` and ``&`` are written as ``\\u003c``, ``\\u003e``, ``\\u0026``, so no corpus
text can close the element or start markup; the script (``assets/browser.js``) puts every string
on the page with ``textContent``, never as HTML. The page loads nothing: no file, no font, no
image, so it works from ``file://`` with no network.
"""

from __future__ import annotations

import html
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from mlsae.core.io import atomic_dir
from mlsae.core.paths import BROWSER_INDEX

_ASSETS = files("mlsae.browse") / "assets"


def script_json(payload: Any) -> str:
    """JSON safe to place inside a ``<script>`` element (no ``<``, ``>``, ``&`` characters)."""
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(payload: dict[str, Any]) -> str:
    """The page's HTML."""
    template = (_ASSETS / "browser.html").read_text(encoding="utf8")
    title = f"mlsae latents: {payload['meta'].get('model') or 'run'}"
    parts = {
        "__TITLE__": html.escape(title),
        "__STYLE__": (_ASSETS / "browser.css").read_text(encoding="utf8"),
        "__SCRIPT__": (_ASSETS / "browser.js").read_text(encoding="utf8"),
        "__DATA__": script_json(payload),
    }
    for key in ("__STYLE__", "__SCRIPT__"):
        if "</" in parts[key]:
            raise ValueError(f"{key}: an inline asset must not contain '</'")
    for key, value in parts.items():
        template = template.replace(key, value)
    return template


def write(payload: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``out_dir/index.html`` (the directory is replaced whole, atomically)."""
    text = render(payload)
    with atomic_dir(out_dir) as tmp:
        (tmp / BROWSER_INDEX).write_text(text, encoding="utf8")
    return Path(out_dir) / BROWSER_INDEX
