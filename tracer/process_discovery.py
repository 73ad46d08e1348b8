"""Find the Ollama server process behind an address, and its runners."""

from __future__ import annotations

from pathlib import Path

import requests
from ollama_tracer.netstat import LISTEN, socket_fds, tcp_rows
from ollama_tracer.vocabulary import LLAMA_SERVER, PROCESS_OTHER, PROCESS_RUNNER, PROCESS_SERVER


def pid_listening_on(port: int) -> int | None:
    """The process holding a listening socket on ``port`` (needs root for other users' processes)."""
    targets = {r.inode for r in tcp_rows() if r.state == LISTEN and r.local_port == port}
    if not targets:
        return None
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and targets & set(socket_fds(proc.name).values()):
            return int(proc.name)
    return None


def ollama_version_of(host: str | None) -> str | None:
    if not host:
        return None
    try:
        return str(requests.get(f"{host}/api/version", timeout=5).json()["version"])
    except (requests.RequestException, ValueError, KeyError):
        return None


# The server's settings that change what a capture shows (and what the diagnosis says).
SETTINGS = ("OLLAMA_NUM_PARALLEL", "OLLAMA_MAX_LOADED_MODELS", "OLLAMA_KEEP_ALIVE", "OLLAMA_CONTEXT_LENGTH",
            "OLLAMA_FLASH_ATTENTION", "OLLAMA_MAX_QUEUE", "OLLAMA_DEBUG")


def server_settings(pid: int | None) -> dict[str, str]:
    """The OLLAMA_* settings in the server's environment (readable as root or the same user)."""
    if pid is None:
        return {}
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    pairs = dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)
    return {key: pairs[key] for key in SETTINGS if key in pairs}


def process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (``R``, ``S``, ``t`` tracing stop, ``Z`` zombie, ...);
    None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[0] if fields else None


def process_alive(pid: int) -> bool:
    """Running, not a zombie (a killed child whose parent has not reaped it yet)."""
    return process_state(pid) not in (None, "Z")


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` (None once it has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` now (a server's runners), in pid order."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and parent_pid(int(entry.name)) == pid:
            found.append(int(entry.name))
    return sorted(found)


def role_of(pid: int, server_pid: int, parent: int | None = None) -> str:
    """``server`` or ``runner`` (one binary serves both; the runner's argv says ``runner``), or
    ``other`` for an Ollama process that is not this server's: ``parent`` (when known) is not the
    server, so it is another server, its runner, or an ``ollama`` CLI command."""
    if pid == server_pid:
        return PROCESS_SERVER
    if parent is not None and parent != server_pid:
        return PROCESS_OTHER
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return PROCESS_RUNNER  # it has exited; every other Ollama process we saw is a runner
    # A Go runner is `ollama runner ...`; on v0.30+ the runner is llama.cpp's own llama-server.
    is_runner = b"runner" in argv[1:2] or Path(argv[0].decode(errors="replace")).name == LLAMA_SERVER
    return PROCESS_RUNNER if is_runner else PROCESS_SERVER
