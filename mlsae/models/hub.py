"""Is the Hugging Face hub reachable, and what is already in its local cache?

`offline()` is true when `HF_HUB_OFFLINE` is set or a TCP connection to the hub's host cannot be
opened within `PROBE_TIMEOUT_S` seconds (name resolution included: it runs in a daemon thread,
since `getaddrinfo` has no timeout of its own). Loaders call it before asking the hub for
anything, so an unreachable hub costs a few seconds and one clear line instead of
huggingface_hub's retry loop (about a minute). `cached_file(repo, name)` is the path of a file
of a hub repository in the local cache, or None; it never touches the network.
"""

from __future__ import annotations

import os
import socket
import threading
from functools import cache
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@cache
def _reachable(host: str, port: int, timeout: float) -> bool:
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def offline(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when the hub must not (HF_HUB_OFFLINE) or cannot (no connection) be asked."""
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return True
    host, port = _endpoint()
    return not _reachable(host, port, timeout)


def cached_file(repo_id: str, filename: str) -> str | None:
    """Local path of `filename` of hub repository `repo_id` if the cache holds it, else None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # an id the hub client rejects is simply not cached
        return None
    return found if isinstance(found, str) else None
