"""The eBPF collector's records read back: bpftrace's event lines on the epoch clock, and its meta.

``nsecs`` is CLOCK_BOOTTIME in the raw events; :func:`parse_line` converts to epoch ns with the
capture's clock model. Stack samples (``P`` blocks) are read by ``collectors.ebpf_profile``.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from ollama_tracer import capture_files
from ollama_tracer.clock import ClockModel
from ollama_tracer.collectors import ebpf_profile
from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.vocabulary import PROCESS_OTHER

RAW_EVENTS = capture_files.EBPF_EVENTS
T = TypeVar("T")


@dataclass(frozen=True)
class ProbeEvent:
    """One line of the eBPF collector's output, on the epoch clock."""

    # A accept, C connect, R read, W write, O openat, X close, U uprobe, N getsockname, E exit,
    # S splice (a forwarder moving bytes between sockets: text "in" from fd, "out" to fd);
    # goroutine layer: G a goroutine serves connection fd, T a goroutine sends a request on fd
    kind: str
    time_ns: int
    pid: int
    tid: int
    fd: int = -1
    value: int = 0  # bytes (read ret / write count), connect ret; accept: the peer's port, N: the local port
    text: str = ""  # first bytes of the buffer, or the opened path, or the probe's symbol
    goid: int = 0  # the goroutine (U, G, T with the goroutine layer; 0: unknown)
    parent_goid: int = 0  # the goroutine that started it (U)


class Timeline(list[ProbeEvent]):
    """A capture's probe events in time order, with their times beside them and a subset per kind
    built once: a window of time is two bisections, so each interval's lookups cost what its own
    window holds, not the whole capture (attribution stays linear in the capture). Not to be
    changed once built: a new list of events is a new Timeline."""

    def __init__(self, events: Iterable[ProbeEvent] = ()) -> None:
        super().__init__(events)
        self.times = [e.time_ns for e in self]
        self._kinds: dict[str, Timeline] = {}
        self.derived: dict[str, tuple[object, Any]] = {}  # see once()

    def once(self, key: str, build: Callable[[], T], depends_on: object = None) -> T:
        """``build()``, computed once per capture under ``key``: again only for another
        ``depends_on`` object (the roles it was built with, say)."""
        cached = self.derived.get(key)
        if cached is None or cached[0] is not depends_on:
            cached = self.derived[key] = (depends_on, build())
        return cached[1]

    def of_kind(self, kinds: str) -> Timeline:
        """The events whose kind is one of ``kinds`` (e.g. ``"G"``, ``"CX"``), in time order."""
        if kinds not in self._kinds:
            self._kinds[kinds] = Timeline(e for e in self if e.kind in kinds)
        return self._kinds[kinds]


def timeline(events: Sequence[ProbeEvent]) -> Timeline:
    """``events`` as a :class:`Timeline` (itself, when it is one)."""
    return events if isinstance(events, Timeline) else Timeline(events)


def between(events: Sequence[ProbeEvent], start_ns: int, end_ns: int) -> list[ProbeEvent]:
    """The events with ``start_ns <= time_ns <= end_ns``."""
    line = timeline(events)
    return line[bisect.bisect_left(line.times, start_ns):bisect.bisect_right(line.times, end_ns)]


def since(events: Sequence[ProbeEvent], start_ns: int) -> Iterator[ProbeEvent]:
    """The events from ``start_ns`` on, in time order (lazily: a search that stops early costs
    what it read)."""
    line = timeline(events)
    return (line[i] for i in range(bisect.bisect_left(line.times, start_ns), len(line)))


def each_between(events: Sequence[ProbeEvent], start_ns: int, end_ns: int) -> Iterator[ProbeEvent]:
    """:func:`between`, lazily: a search that stops at its first match costs what it read."""
    line = timeline(events)
    return (line[i] for i in range(bisect.bisect_left(line.times, start_ns), bisect.bisect_right(line.times, end_ns)))


def latest_first(events: Sequence[ProbeEvent], end_ns: int) -> Iterator[ProbeEvent]:
    """The events up to ``end_ns``, the latest first (lazily)."""
    line = timeline(events)
    return (line[i] for i in range(bisect.bisect_right(line.times, end_ns) - 1, -1, -1))


class ParseError(ValueError):
    pass


def parse_line(line: str, clock: ClockModel, probes: dict[int, str]) -> ProbeEvent:
    """Parse one output line; raises ParseError (a ValueError) on anything malformed."""
    parts = line.rstrip("\n").split(" ", 6)
    if len(parts) < 4 or len(parts[0]) != 1 or parts[0] not in "ACRWOXUGTNES":
        raise ParseError(f"not an event line: {line[:80]!r}")
    kind = parts[0]
    try:
        boot_ns, pid, tid = int(parts[1]), int(parts[2]), int(parts[3])
        when = clock.to_epoch("boottime", boot_ns)
        if kind == "U":
            if len(parts) == 7:
                return ProbeEvent(kind, when, pid, tid, text=probes[int(parts[4])], goid=int(parts[5]),
                                  parent_goid=int(parts[6]))
            if len(parts) != 5:
                raise ParseError(f"malformed U event: {line[:80]!r}")
            return ProbeEvent(kind, when, pid, tid, text=probes[int(parts[4])])
        if kind in "GT":
            if len(parts) != 6:
                raise ParseError(f"malformed {kind} event: {line[:80]!r}")
            return ProbeEvent(kind, when, pid, tid, fd=int(parts[4]), goid=int(parts[5]))
        if kind in "AN":
            rest = line.rstrip("\n").split(" ", 5)  # the port's bytes may print as a space
            return ProbeEvent(kind, when, pid, tid, fd=int(parts[4]),
                              value=peer_port(rest[5]) if len(rest) > 5 else 0)
        if kind in "CXE":
            return ProbeEvent(kind, when, pid, tid, fd=int(parts[4]), value=int(parts[5]))
        if kind in "RWS":
            return ProbeEvent(kind, when, pid, tid, fd=int(parts[4]), value=int(parts[5]),
                              text=parts[6] if len(parts) > 6 else "")
        text = " ".join(parts[5:]) if len(parts) > 5 else ""
        return ProbeEvent(kind, when, pid, tid, fd=int(parts[4]), text=text)
    except (IndexError, KeyError, ValueError, OverflowError) as err:  # Overflow: a huge nsecs in the clock
        raise ParseError(f"malformed {kind} event: {line[:80]!r} ({err})") from None


def peer_port(printed: str) -> int:
    """bpftrace's ``%r`` of the 2 port bytes (``\\xc2\\x08``, printable bytes as themselves) → 49672."""
    # Only ``\xNN`` is an escape: a backslash byte prints as itself, which unicode_escape misreads.
    raw = bytes(int(escaped, 16) if escaped else ord(char)  # ValueError for a character past \xff
                for escaped, char in re.findall(r"\\x([0-9a-fA-F]{2})|(.)", printed, re.DOTALL))
    if len(raw) != 2:
        raise ValueError(f"not a 2-byte port: {printed!r}")
    return int.from_bytes(raw, "big")


def load_events(directory: Path, clock: ClockModel) -> tuple[list[ProbeEvent], dict[str, Any], int]:
    """(events in time order, the collector's meta, number of unparsable lines). A meta that is not what
    the collector wrote raises TracerError (BAD_CAPTURE): without it no event has a process or a probe."""
    meta_path = directory / capture_files.EBPF_META
    if not meta_path.exists():
        return [], {}, 0
    meta = capture_files.read_json(meta_path, "the eBPF collector's meta")
    problem = _meta_problem(meta)
    if problem is not None:
        raise TracerError(f"{meta_path} is corrupt (its {problem} is not what the eBPF collector writes); "
                          "re-run the capture.", ExitCode.BAD_CAPTURE)
    probes = {int(k): v for k, v in (meta.get("probe_index") or {}).items()}
    events: list[ProbeEvent] = []
    bad = 0
    path = directory / RAW_EVENTS
    if path.exists():
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if not line.strip() or line.startswith(("\t", "P ")):
                    continue  # stack samples: ebpf_profile.load_samples reads them
                try:
                    events.append(parse_line(line, clock, probes))
                except ParseError:
                    bad += 1
    events.sort(key=lambda e: e.time_ns)
    return Timeline(join_split_reads(events)), meta, bad


def join_split_reads(events: list[ProbeEvent]) -> list[ProbeEvent]:
    """A request whose first byte Go's background read took (1 byte, while the connection's
    previous response was being finished) and whose rest came with the next read, as the one read
    it is: at the first byte's time, with the rest's text after that byte. A 1-byte read not
    followed by more of it (the peer went away) stays as it is."""
    held: dict[tuple[int, int], int] = {}  # (pid, fd) -> index in out of its 1-byte read
    out: list[ProbeEvent] = []
    for e in events:
        key = (e.pid, e.fd)
        if e.kind == "R" and e.value == 1:
            held[key] = len(out)
        elif e.kind == "R" and e.value > 0 and key in held:
            index = held.pop(key)
            first = out[index]
            # In the first byte's place, so the events stay in time order.
            out[index] = replace(e, time_ns=first.time_ns, value=e.value + 1,
                                 text=(first.text[:1] + e.text)[:len(e.text)])
            continue
        elif e.kind in "RX" and key in held:
            held.pop(key)  # EOF, an error or a close: nothing more of it came
        out.append(e)
    return out


Roles = Mapping[int, "str | None"]  # pid -> "server" / "runner" (None: neither, or not known)


@dataclass
class EbpfRecords:
    """The probe events of the server and its runners (time order), who each process was, the
    collector's meta, and the native stack samples when the profile probe ran."""

    events: list[ProbeEvent]
    meta: dict[str, Any]
    roles: dict[int, str | None]
    native_stacks: list[ebpf_profile.StackSample] = field(default_factory=list)
    unreadable: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.events = timeline(self.events)

    @property
    def profile_hz(self) -> int:
        return int(self.meta.get("profile_hz") or 0)


def load(directory: Path, clock: ClockModel | None) -> EbpfRecords | None:
    """bpftrace's records placed on the epoch clock; None for a capture without the collector."""
    if not (directory / capture_files.EBPF_META).exists():
        return None
    if clock is None:
        raise TracerError(f"{directory / capture_files.CAPTURE_JSON} has no clock, so the eBPF events cannot be "
                          "placed in time; re-run the capture.", ExitCode.BAD_CAPTURE)
    events, meta, bad = load_events(directory, clock)
    server_pid = int(meta["pid"])
    recorded = meta.get("roles") or {}
    from ollama_tracer.process_discovery import role_of

    roles = {pid: recorded.get(str(pid)) or role_of(pid, server_pid) for pid in {e.pid for e in events}}
    # Another server's processes (same comm, so recorded too) are not this capture's: left out.
    others = {pid for pid, role in roles.items() if role == PROCESS_OTHER}
    if others:
        events = Timeline(e for e in events if e.pid not in others)
        roles = {pid: role for pid, role in roles.items() if pid not in others}
        meta["other_pids"] = sorted(others)
    records = EbpfRecords(events, meta, roles, unreadable={capture_files.EBPF_EVENTS: bad})
    if meta.get("profile_hz"):
        records.native_stacks, bad_stacks = ebpf_profile.load_samples(directory, clock)
        records.native_stacks = [s for s in records.native_stacks if s.pid not in others]
        records.unreadable[f"{capture_files.EBPF_EVENTS} (stacks)"] = bad_stacks
    return records


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """The first field of the collector's meta that attribution reads and that does not have the shape
    the collector writes, if any."""

    def is_int(value: Any, bound: int = 2**63) -> bool:
        return type(value) is int and abs(value) < bound

    def is_int_text(key: str) -> bool:
        try:
            int(key)
        except ValueError:
            return False
        return True

    probe_index, roles, blobs = meta.get("probe_index") or {}, meta.get("roles") or {}, meta.get("model_blobs", [])
    plan, sockets = meta.get("plan") or {}, meta.get("sockets_at_start") or []
    goroutines = plan.get("goroutines", {}) if isinstance(plan, dict) else None
    fields = {
        "pid": is_int(meta.get("pid")),
        "probe_index": isinstance(probe_index, dict)
        and all(is_int_text(k) and isinstance(v, str) for k, v in probe_index.items()),
        "roles": isinstance(roles, dict) and all(v is None or isinstance(v, str) for v in roles.values()),
        "model_blobs": isinstance(blobs, list) and all(isinstance(b, str) for b in blobs),
        "profile_hz": meta.get("profile_hz") is None or (is_int(meta["profile_hz"], 2**32) and meta["profile_hz"] >= 0),
        "plan": isinstance(plan, dict) and isinstance(goroutines, dict) and isinstance(goroutines.get("note", ""), str)
        and isinstance(plan.get("version") or "", str),
        "sockets_at_start": isinstance(sockets, list) and all(
            isinstance(s, dict) and all(is_int(s.get(k)) for k in ("pid", "fd", "local_port", "remote_port"))
            for s in sockets),
    }
    return next((name for name, ok in fields.items() if not ok), None)
