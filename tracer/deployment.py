"""How the Ollama behind an address is deployed: a plain process, a system service, or a container.

Everything here is read from ``/proc``, so it needs no Docker, systemd or Ollama API:

* **the forwarder.** A published container port belongs to a userland forwarder (Docker's
  ``docker-proxy``, or socat, rootlesskit, ...), not to Ollama. :func:`follow` sees that the
  process listening on the port is not an Ollama server and finds the one behind it: from
  docker-proxy's own arguments (``-container-ip A -container-port P``), or, for any other
  forwarder, by opening a connection through it and reading which address the forwarder
  connected onward to; the server is the process listening there (in any network namespace).
* **the service unit**, from the server's cgroup (``/system.slice/ollama.service``, on cgroup v1
  or v2): its log is then in the journal (``journalctl -u ollama``).
* **the container**, from its PID namespace (``NSpid`` in ``/proc/PID/status``: the host pid and
  the pid inside) and its mount namespace or root: then its binary and libraries are read
  through ``/proc/PID/root``, the only place the host can see them.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ollama_tracer.netstat import LISTEN, socket_fds
from ollama_tracer.ollama_host import host_and_port
from ollama_tracer.process_discovery import children_of, pid_listening_on
from ollama_tracer.vocabulary import LLAMA_SERVER

PLAIN, SERVICE, CONTAINER = "plain process", "system service", "container"
UNIT_CGROUP = re.compile(r"/system\.slice/(?P<unit>[^/]+)\.service$")
CONTAINER_CGROUP = re.compile(r"(?:/docker/|docker-|/libpod-|/containerd/)(?P<id>[0-9a-f]{12,64})")
ESTABLISHED = "01"
DOCKER_CONTAINERS = Path("/var/lib/docker/containers")


@dataclass(frozen=True)
class Endpoint:
    address: str  # dotted IPv4 (IPv6 as the kernel prints it)
    port: int


@dataclass
class Forwarder:
    pid: int
    name: str  # its comm, e.g. docker-proxy
    published_port: int
    target: Endpoint
    how: str  # "arguments" (docker-proxy's flags) or "connection" (followed through it)


@dataclass
class Deployment:
    """What was found about one server process."""

    kind: str
    pid: int
    unit: str | None = None  # the systemd unit, for a service
    container_id: str | None = None  # from the cgroup, when a container runtime names it
    pid_inside: int | None = None  # the server's pid in its own PID namespace
    root: str | None = None  # /proc/PID/root when its filesystem is not ours
    forwarder: Forwarder | None = None
    user: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def host_path(self, path: str | Path) -> Path:
        """A path as the server sees it, as this process can open it."""
        return Path(self.root) / Path(path).relative_to("/") if self.root else Path(path)

    def stderr_file(self) -> Path | None:
        """The file the server's stderr goes to (``ollama serve 2> FILE``), when it is a file on this
        machine's filesystem; None for a pipe, the journal's socket, or a container's own file."""
        if self.root:
            return None
        try:
            target = os.readlink(f"/proc/{self.pid}/fd/2")
        except OSError:
            return None
        path = Path(target)
        return path if path.is_absolute() and path.is_file() else None

    def docker_log(self) -> Path | None:
        """Docker's json-file log of the container (``/var/lib/docker/containers/ID/ID-json.log``), if there."""
        if not self.container_id or len(self.container_id) != 64:
            return None
        path = DOCKER_CONTAINERS / self.container_id / f"{self.container_id}-json.log"
        return path if path.is_file() else None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def comm(pid: int) -> str:
    return _read(f"/proc/{pid}/comm").strip()


def is_llama_server(pid: int) -> bool:
    """llama.cpp's server, by its binary's name: run alone when it is the pid a capture traces."""
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).name == LLAMA_SERVER
    except OSError:
        return comm(pid) == LLAMA_SERVER


def is_ollama(pid: int) -> bool:
    """An Ollama server or runner: its comm, or its binary's name, is ``ollama`` (or starts with it,
    as a versioned ``ollama-0.13.5`` does) or ``llama-server``. Never a forwarder to follow."""
    try:
        exe = Path(os.readlink(f"/proc/{pid}/exe")).name
    except OSError:
        exe = ""
    return any(name == LLAMA_SERVER or name.startswith("ollama") for name in (comm(pid), exe) if name)


def ns_inode(pid: int | str, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def ns_pids(pid: int) -> list[int]:
    """``NSpid``: the pid in each PID namespace, the host's first."""
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("NSpid:"):
            return [int(p) for p in line.split()[1:]]
    return [pid]


def cgroup_paths(pid: int) -> list[str]:
    return [line.split(":", 2)[2] for line in _read(f"/proc/{pid}/cgroup").splitlines() if line.count(":") >= 2]


def foreign_root(pid: int) -> str | None:
    """``/proc/PID/root`` when the process sees another filesystem than we do (a container's)."""
    try:
        own_root = os.readlink(f"/proc/{pid}/root")
    except OSError:
        return None
    if own_root != "/" or ns_inode(pid, "mnt") != ns_inode("self", "mnt"):
        return f"/proc/{pid}/root"
    return None


def user_of(pid: int) -> str | None:
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])
            try:
                import pwd

                return pwd.getpwuid(uid).pw_name
            except KeyError:
                return str(uid)
    return None


def detect(pid: int, forwarder: Forwarder | None = None) -> Deployment:
    """The deployment of server ``pid`` (found behind ``forwarder``, if any)."""
    found = Deployment(kind=PLAIN, pid=pid, forwarder=forwarder, user=user_of(pid))
    for path in cgroup_paths(pid):
        unit = UNIT_CGROUP.search(path)
        if unit and found.unit is None:
            found.unit = unit["unit"]
        container = CONTAINER_CGROUP.search(path)
        if container and found.container_id is None:
            found.container_id = container["id"]
    pids = ns_pids(pid)
    found.root = foreign_root(pid)
    if len(pids) > 1 or found.root or found.container_id:
        found.kind = CONTAINER
        found.pid_inside = pids[-1]
    elif found.unit:
        found.kind = SERVICE
    return found


# ------------------------------------------------------------------------------ the forwarder


def _tcp_table(pid: int | str) -> list[tuple[Endpoint, Endpoint, str, str]]:
    """(local, remote, state, inode) of ``/proc/PID/net/tcp``: the process's network namespace."""
    rows = []
    for table in ("tcp", "tcp6"):
        for line in _read(f"/proc/{pid}/net/{table}").splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9:
                rows.append((_endpoint(fields[1]), _endpoint(fields[2]), fields[3], fields[9]))
    return rows


def _endpoint(text: str) -> Endpoint:
    address, port = text.rsplit(":", 1)
    if len(address) == 8:
        address = socket.inet_ntoa(bytes.fromhex(address)[::-1])
    return Endpoint(address, int(port, 16))


def listener_pid(port: int, address: str | None = None, *, skip: set[int] | None = None) -> int | None:
    """A process listening on ``port`` (at ``address`` or a wildcard) in any network namespace."""
    seen_ns: dict[int, set[str]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in (skip or set()):
            continue
        net = ns_inode(proc.name, "net")
        if net is None:
            continue
        if net not in seen_ns:
            wanted = None if address is None else {address, "0.0.0.0", "0" * 32}  # or a wildcard
            seen_ns[net] = {inode for local, _, state, inode in _tcp_table(proc.name)
                            if state == LISTEN and local.port == port and (wanted is None or local.address in wanted)}
        if seen_ns[net] & set(socket_fds(proc.name).values()):
            return int(proc.name)
    return None


def docker_proxy_target(pid: int) -> Endpoint | None:
    """docker-proxy's ``-container-ip A -container-port P``."""
    argv = _read(f"/proc/{pid}/cmdline").split("\0")
    try:
        return Endpoint(argv[argv.index("-container-ip") + 1], int(argv[argv.index("-container-port") + 1]))
    except (ValueError, IndexError):
        return None


def _onward_connection(pid: int, published_port: int) -> Endpoint | None:
    """Open a connection through the forwarder and see where it connects onward."""
    with socket.create_connection(("127.0.0.1", published_port), timeout=5) as probe:
        probe.sendall(b"GET /api/version HTTP/1.1\r\nHost: tracer\r\nConnection: keep-alive\r\n\r\n")
        probe.settimeout(5)
        try:
            probe.recv(4096)  # answered: the onward connection is up
        except OSError:
            return None
        # socat and other forking forwarders hold the onward connection in a child
        own = {inode for p in (pid, *children_of(pid)) for inode in socket_fds(p).values()}
        for local, remote, state, inode in _tcp_table(pid):
            if inode in own and state == ESTABLISHED and local.port != published_port:
                return remote
    return None


def follow(port: int, pid: int | None = None) -> tuple[int | None, Forwarder | None]:
    """The Ollama server behind ``port``: (its pid, the forwarder in between or None)."""
    pid = pid or pid_listening_on(port)
    if pid is None or is_ollama(pid):
        return pid, None
    target, how = docker_proxy_target(pid), "arguments"
    if target is None:
        target, how = _onward_connection(pid, port), "connection"
    if target is None:
        return pid, None
    behind = listener_pid(target.port, target.address, skip={pid})
    if behind is None:
        return pid, None
    return behind, Forwarder(pid=pid, name=comm(pid), published_port=port, target=target, how=how)


def server_pid(host: str | None) -> int | None:
    """The pid of the Ollama server that answers on ``host``, through a forwarder if one holds the port."""
    if not host:
        return None
    return follow(host_and_port(host)[1])[0]


def describe(host: str | None, pid: int | None) -> dict[str, Any] | None:
    """capture.json's ``server.deployment``: what :func:`detect` found, with the forwarder, if any.
    Never raises: a capture records what it can."""
    if pid is None:
        return None
    try:
        forwarder = follow(host_and_port(host)[1])[1] if host else None
    except OSError:
        forwarder = None
    return detect(pid, forwarder).to_json()
