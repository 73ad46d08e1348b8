"""Struct field offsets of a Go binary, read from its DWARF, for the eBPF goroutine layer.

Matching a request's server-side events to it under concurrency needs two facts no syscall
carries: which goroutine an event ran on, and which connection (fd) a goroutine serves. Both
are a few pointer reads away in Go's own structures:

* ``runtime.g.goid`` and ``runtime.g.parentGoid`` (Go ≥ 1.21): the goroutine (register r14)
  and the one that started it: the handler's goroutine starts the one that calls the runner;
* ``net/http.conn.rwc`` → ``net.TCPConn.conn`` → ``net.conn.fd`` → ``net.netFD.pfd`` →
  ``internal/poll.FD.Sysfd``: the fd a ``(*conn).serve`` goroutine serves;
* ``net/http.persistConn.conn``: the same chain for the server's client connection to a runner.

Layouts change between Go versions, so they are never assumed: they come from the binary's
DWARF (present unless it was built with ``-w``, as release builds are), and are cached per
binary because reading them takes seconds. Without DWARF the goroutine layer is off, and
requests that overlap in the server are reported as unmatched, not guessed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ollama_tracer.capture_files import read_json_object

# (struct, field) -> the attribute of GoOffsets it fills
FIELDS: dict[tuple[str, str], str] = {
    ("runtime.g", "goid"): "g_goid",
    ("runtime.g", "parentGoid"): "g_parent_goid",
    ("net/http.conn", "rwc"): "http_conn_rwc",
    ("net/http.persistConn", "conn"): "persist_conn_conn",
    ("net.TCPConn", "conn"): "tcpconn_conn",
    ("net.conn", "fd"): "conn_fd",
    ("net.netFD", "pfd"): "netfd_pfd",
    ("internal/poll.FD", "Sysfd"): "pollfd_sysfd",
}
SCHEMA = 1


@dataclass(frozen=True)
class GoOffsets:
    g_goid: int
    g_parent_goid: int
    http_conn_rwc: int
    persist_conn_conn: int
    tcpconn_conn: int
    conn_fd: int
    netfd_pfd: int
    pollfd_sysfd: int

    def fd_of_conn_iface(self, iface_at: str) -> str:
        """A bpftrace expression: the Sysfd behind a ``net.Conn`` interface stored at ``iface_at``
        (an expression giving its address). An interface is (itab, data); data is *net.TCPConn."""
        tcp = f"*(uint64*)({iface_at} + 8)"
        netfd = f"*(uint64*)({tcp} + {self.tcpconn_conn + self.conn_fd})"
        return f"*(int64*)({netfd} + {self.netfd_pfd + self.pollfd_sysfd})"


def _cache_path(binary: Path) -> Path:
    stat = binary.stat()
    key = hashlib.sha256(f"{binary.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{SCHEMA}".encode()).hexdigest()[:24]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ollama-tracer" / "go-offsets"
    return root / f"{key}.json"


def read_offsets(binary: Path) -> tuple[GoOffsets | None, str]:
    """(offsets, "") or (None, why not). Reads the cache first; never raises on a bad binary."""
    try:
        cache = _cache_path(binary)
    except OSError as err:
        return None, f"cannot read {binary} ({err.strerror})"
    cached = read_json_object(cache)
    try:
        if cached is not None:
            return (GoOffsets(**cached["offsets"]), "") if cached.get("offsets") else (None, str(cached["reason"]))
    except (KeyError, TypeError):
        pass  # a cache from another version of this module: recomputed below
    offsets, reason = _from_dwarf(binary)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"offsets": asdict(offsets) if offsets else None, "reason": reason}))
    except OSError:
        pass  # a read-only home: the next capture reads the DWARF again
    return offsets, reason


def _from_dwarf(binary: Path) -> tuple[GoOffsets | None, str]:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    wanted: dict[str, set[str]] = {}
    for struct, field_name in FIELDS:
        wanted.setdefault(struct, set()).add(field_name)
    found: dict[str, int] = {}
    try:
        with binary.open("rb") as handle:
            elf = ELFFile(handle)
            if not elf.has_dwarf_info() or elf.get_section_by_name(".debug_info") is None:
                return None, f"{binary.name} has no DWARF (built with -w, as release builds are)"
            dwarf = elf.get_dwarf_info()
            for unit in dwarf.iter_CUs():
                # Go's linker puts the types in units named "runtime"; stop once all are found.
                top = unit.get_top_DIE()
                name = top.attributes.get("DW_AT_name")
                if name is None or name.value != b"runtime":
                    continue
                for die in top.iter_children():
                    if die.tag != "DW_TAG_structure_type" or "DW_AT_name" not in die.attributes:
                        continue
                    struct = die.attributes["DW_AT_name"].value.decode(errors="replace")
                    if struct not in wanted:
                        continue
                    for member in die.iter_children():
                        member_name = member.attributes.get("DW_AT_name")
                        location = member.attributes.get("DW_AT_data_member_location")
                        if member.tag == "DW_TAG_member" and member_name is not None and location is not None:
                            key = (struct, member_name.value.decode(errors="replace"))
                            if key in FIELDS and isinstance(location.value, int):
                                found[FIELDS[key]] = location.value
                if len(found) == len(FIELDS):
                    break
    except (OSError, ELFError, ValueError, KeyError) as err:
        return None, f"cannot read the DWARF of {binary.name} ({err})"
    missing = sorted(f"{s}.{f}" for (s, f), attr in FIELDS.items() if attr not in found)
    if missing:
        return None, f"{binary.name}'s DWARF lacks {', '.join(missing)} (Go older than 1.21 has no parentGoid)"
    return GoOffsets(**found), ""
