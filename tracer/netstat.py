"""Read the kernel's TCP table to check that a server really saw a client's disconnect."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ESTABLISHED = "01"
CLOSE_WAIT = "08"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


LISTEN = "0A"


@dataclass(frozen=True)
class TcpRow:
    local_port: int
    remote_port: int
    state: str  # the kernel's hex state code, e.g. "01" ESTABLISHED
    inode: str


def tcp_rows() -> Iterator[TcpRow]:
    """Rows of /proc/net/tcp and tcp6 (this network namespace)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9:
                yield TcpRow(int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16),
                             fields[3], fields[9])


def server_side_states(server_port: int, client_port: int) -> list[str]:
    """TCP states of the server's end of the connection from ``client_port`` (loopback only)."""
    return [r.state for r in tcp_rows() if r.local_port == server_port and r.remote_port == client_port]


def socket_fds(pid: int | str = "self") -> dict[int, str]:
    """fd -> socket inode of a process's open sockets (empty if it is gone or not ours to read)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    found = {}
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return {}
    for fd in fds:
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:[") and fd.name.isdigit():
            found[int(fd.name)] = target[8:-1]
    return found


def own_client_ports(host: str) -> set[int]:
    """Local ports of this process's TCP connections to ``host`` (matched by socket inode)."""
    parts = urlsplit(host)
    if parts.hostname not in LOOPBACK_HOSTS or parts.port is None:
        return set()
    inodes = set(socket_fds().values())
    return {r.local_port for r in tcp_rows() if r.inode in inodes and r.remote_port == parts.port}


def server_saw_close(host: str, client_port: int | None, timeout_s: float = 1.0) -> bool | None:
    """True once the server has closed its end of the connection (not ESTABLISHED or CLOSE_WAIT).

    CLOSE_WAIT would mean the kernel got our FIN but the Ollama process has not acted on it.
    None when it cannot be checked: a remote server, or an unknown client port.
    """
    parts = urlsplit(host)
    if client_port is None or parts.hostname not in LOOPBACK_HOSTS or parts.port is None:
        return None
    deadline = time.monotonic() + timeout_s
    while True:
        states = server_side_states(parts.port, client_port)
        if not any(s in (ESTABLISHED, CLOSE_WAIT) for s in states):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
