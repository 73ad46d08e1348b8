"""Native stacks of the Ollama server and runners: a ``profile:hz:N`` probe in the eBPF collector.

The probe runs in the same bpftrace process as the syscall and uprobe layers (one start-up, one
reader), filtered by ``comm`` so only Ollama's own threads are sampled. Each sample is printed
as a ``P`` header line followed by the user stack, one ``\\t<hex address> ...`` line per frame
(leaf first) and a blank line. bpftrace runs with ``BPFTRACE_NO_USER_SYMBOLS=1``: resolving
symbols inside bpftrace would cost CPU on the machine being observed and gives ``[unknown]``
for stripped binaries anyway. Addresses are resolved once, when the capture stops, with the
binary's ELF symbols or Go's ``.gopclntab`` (which survives stripping) and ``/proc/PID/maps``
snapshots taken when each process is first seen; the result is ``raw/ebpf_symbols.json``, so
a capture directory can be re-reported on a machine without the binaries.

Go frames unwind by frame pointers; C/C++ code built without them (ggml) yields 1-3 frames.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ollama_tracer import capture_files
from ollama_tracer.clock import ClockModel
from ollama_tracer.collectors.symbols import SymbolTable
from ollama_tracer.errors import TracerError

DEFAULT_HZ = 99  # not 100: a rate that beats against 100 Hz timers would sample them in lockstep
STACK_DEPTH = 32
RAW_SYMBOLS = capture_files.EBPF_SYMBOLS
RAW_MAPS = capture_files.EBPF_MAPS


def probe(hz: int, process_filter: str) -> str:
    """The bpftrace clause; ``process_filter`` is the same predicate as the syscall layer's."""
    return (f'profile:hz:{hz} /{process_filter}/ {{ printf("P %llu %d %d\\n%s\\n", nsecs, pid, tid, '
            f"ustack(perf, {STACK_DEPTH})); }}")


@dataclass(frozen=True)
class StackSample:
    """One on-CPU sample of an Ollama thread: epoch ns, and frames from root to leaf."""

    time_ns: int
    pid: int
    tid: int
    frames: tuple[str, ...]


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    offset: int
    path: str


def read_maps(pid: int) -> list[Mapping]:
    """The file-backed executable mappings of a process (empty if it is gone)."""
    mappings = []
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or "x" not in parts[1] or not parts[5].startswith("/"):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        mappings.append(Mapping(start, end, int(parts[2], 16), parts[5]))
    return mappings


def parse_samples(lines: Iterable[str], clock: ClockModel) -> Iterator[tuple[int, int, int, tuple[int, ...]] | None]:
    """(epoch ns, pid, tid, addresses leaf→root) per ``P`` block of the raw events; None for a
    malformed block. Lines of other event kinds are skipped (``ebpf_events.load_events`` reads them)."""
    current: tuple[int, int, int] | None = None
    addresses: list[int] = []
    bad = False
    blank_seen = False  # bpftrace's stack string starts with a newline: one blank line, then frames
    for line in lines:
        if line.startswith("\t") and current is not None:
            word = line.strip().split(" ", 1)[0]
            try:
                addresses.append(int(word, 16))
            except ValueError:
                bad = True
            continue
        if current is not None and not line.strip():
            if not addresses and not blank_seen:
                blank_seen = True
                continue
            yield None if bad else (*current, tuple(addresses))
            current, addresses, bad = None, [], False
            continue
        if line.startswith("P "):
            if current is not None:
                yield None if bad else (*current, tuple(addresses))
            addresses, bad, blank_seen = [], False, False
            parts = line.split()
            try:
                if len(parts) != 4:
                    raise ValueError(line)
                current = (clock.to_epoch("boottime", int(parts[1])), int(parts[2]), int(parts[3]))
            except (ValueError, OverflowError):  # Overflow: a huge nsecs in the clock's interpolation
                current, bad = None, False
                yield None
    if current is not None:
        yield None if bad else (*current, tuple(addresses))


class Symbolizer:
    """Address → function name for one capture: per-process mappings, one symbol table per file."""

    def __init__(self, maps: dict[int, list[Mapping]], fallback_binary: Path | None = None) -> None:
        self.maps = maps
        self.fallback_binary = fallback_binary
        self._tables: dict[str, SymbolTable | None] = {}

    def _table(self, path: str) -> SymbolTable | None:
        if path not in self._tables:
            try:
                self._tables[path] = SymbolTable.load(Path(path))
            except (OSError, ValueError):
                self._tables[path] = None
        return self._tables[path]

    def name(self, pid: int, address: int) -> str:
        for mapping in self.maps.get(pid, ()):
            if mapping.start <= address < mapping.end:
                table = self._table(mapping.path)
                offset = address - mapping.start + mapping.offset
                vaddr = table.address_of_file_offset(offset) if table is not None else None
                found = table.function_at(vaddr) if table is not None and vaddr is not None else None
                return str(found) if found else f"{Path(mapping.path).name}+{offset:#x}"
        if self.fallback_binary is not None:  # the process exited before its maps were read
            table = self._table(str(self.fallback_binary))
            found = table.function_at(address) if table is not None else None
            if found:
                return str(found)
        return f"{address:#x}"


def symbolize_capture(directory: Path, clock: ClockModel, maps: dict[int, list[Mapping]],
                      binary: Path | None) -> dict[str, int]:
    """Resolve every sampled address once and write ``raw/ebpf_symbols.json``; returns counts."""
    path = directory / capture_files.EBPF_EVENTS
    wanted: dict[int, set[int]] = {}
    samples = 0
    if path.exists():
        with path.open(encoding="utf-8", errors="replace") as lines:
            for block in parse_samples(lines, clock):
                if block is None:
                    continue
                samples += 1
                wanted.setdefault(block[1], set()).update(block[3])
    symbolizer = Symbolizer(maps, binary)
    names = {str(pid): {f"{a:#x}": symbolizer.name(pid, a) for a in sorted(addrs)} for pid, addrs in wanted.items()}
    unresolved = sum(1 for table in names.values() for n in table.values() if n.startswith("0x"))
    capture_files.write_json(directory / RAW_SYMBOLS, {"symbols": names, "unresolved": unresolved})
    capture_files.write_json(directory / RAW_MAPS, {str(pid): [m.__dict__ for m in ms] for pid, ms in maps.items()})
    return {"profile_samples": samples, "profile_addresses": sum(len(v) for v in names.values()),
            "profile_unresolved": unresolved}


def load_samples(directory: Path, clock: ClockModel) -> tuple[list[StackSample], int]:
    """(stack samples in time order, number of malformed blocks) of a capture."""
    path = directory / capture_files.EBPF_EVENTS
    if not path.exists():
        return [], 0
    try:
        table = capture_files.read_json(directory / RAW_SYMBOLS, "the resolved stack addresses")
        symbols: dict[str, dict[str, str]] = table["symbols"]
    except (TracerError, KeyError):
        symbols = {}
    samples, bad = [], 0
    with path.open(encoding="utf-8", errors="replace") as lines:
        for block in parse_samples(lines, clock):
            if block is None:
                bad += 1
                continue
            when, pid, tid, addresses = block
            names = symbols.get(str(pid), {}) if isinstance(symbols, dict) else {}
            names = names if isinstance(names, dict) else {}  # a damaged table: the addresses, unnamed
            frames = tuple(str(names.get(f"{a:#x}", f"{a:#x}")) for a in reversed(addresses))
            samples.append(StackSample(when, pid, tid, frames))
    samples.sort(key=lambda s: s.time_ns)
    return samples, bad
