"""Resolve OLLAMA_HOST the way the Ollama CLI and Python client do."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

DEFAULT_PORT = 11434


def resolve_host(value: str | None = None) -> str:
    """Return a base URL such as ``http://127.0.0.1:11434`` for ``value`` or ``$OLLAMA_HOST``.

    Accepts the forms users put in OLLAMA_HOST: ``host``, ``host:port``, ``:port``, and full
    URLs. A wildcard bind address (0.0.0.0) means "this machine" to a client.
    """
    raw = (value if value is not None else os.environ.get("OLLAMA_HOST", "")).strip()
    if not raw:
        raw = f"127.0.0.1:{DEFAULT_PORT}"
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else DEFAULT_PORT)
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}"


def host_and_port(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    return parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORT
