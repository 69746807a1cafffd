"""The browser's single page: ``index.html`` with its data, script and style inline.

The payload (`mlsae.browse.data`) goes into ``<script type="application/json" id="data">`` as
JSON whose ``<``, ``>`` and ``&`` are written as ``\\u003c``, ``\\u003e``, ``\\u0026``, so no corpus
text can close the element or start markup; the script (``assets/browser.js``) puts every string
on the page with ``textContent``, never as HTML. The page loads nothing: no file, no font, no
image, so it works from ``file://`` with no network.

A second wall behind the escaping: the page's Content-Security-Policy allows exactly its own
inline script and style, by their sha256 (``'sha256-...'``, no ``'unsafe-inline'``), so markup that
got in anyway could not run an inline handler (``onerror=...``) or a script of its own.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
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


def csp_source(text: str) -> str:
    """The CSP hash-source allowing exactly the inline element whose content is `text`."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf8")).digest()).decode() + "'"


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
    # the CSP allows the inline script and style by the hash of their exact content (the
    # template's text between the tags, with the asset in place), filled in before anything else
    for tag, key, slot in (("script", "__SCRIPT__", "__SCRIPT_HASH__"), ("style", "__STYLE__", "__STYLE_HASH__")):
        body = re.search(rf"<{tag}>(.*?)</{tag}>", template, re.S)
        if body is None or key not in body.group(1):
            raise ValueError(f"browser.html: no <{tag}> element holding {key}")
        template = template.replace(slot, csp_source(body.group(1).replace(key, parts[key])), 1)
    for key, value in parts.items():
        template = template.replace(key, value)
    return template


def write(payload: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``out_dir/index.html`` (the directory is replaced whole, atomically)."""
    text = render(payload)
    with atomic_dir(out_dir) as tmp:
        (tmp / BROWSER_INDEX).write_text(text, encoding="utf8")
    return Path(out_dir) / BROWSER_INDEX
