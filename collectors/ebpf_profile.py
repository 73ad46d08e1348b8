"""Native stacks of the Ollama server and runners: a ``profile:hz:N`` probe in the eBPF collector.

The probe runs in the same bpftrace process as the syscall and uprobe layers (one start-up, one
reader), filtered by ``comm`` so only Ollama's own threads are sampled. Samples are counted in
the kernel, in a bpftrace map keyed by (millisecond, pid, tid, user stack), not printed one by
one: a printed sample woke bpftrace and the collector's reader on the observed machine 99 times a
second per busy thread (``benchmarks/observer_budget.py`` measures both). Two maps take turns
(``@P0``, ``@P1``): every :func:`flush_ms` the probe switches to the other, and bpftrace prints and
clears the one just filled, so nothing is lost between the print and the clear and a map never
holds more than about :data:`FLUSH_ENTRIES` entries (bpftrace's default limit is 4096). The
time resolution of a sample is therefore :data:`BUCKET_NS` (1 ms), a tenth of the sampling
period. The collector's reader turns each printed entry back into ``count`` ``P`` blocks, at the
middle of its millisecond: a ``P`` header line followed by the user stack, one
``\\t<hex address> ...`` line per frame (leaf first) and a blank line, the format of the raw
events file. bpftrace runs with ``BPFTRACE_NO_USER_SYMBOLS=1``: resolving
symbols inside bpftrace would cost CPU on the machine being observed and gives ``[unknown]``
for stripped binaries anyway. Addresses are resolved once, when the capture stops, with the
binary's ELF symbols or Go's ``.gopclntab`` (which survives stripping) and ``/proc/PID/maps``
snapshots taken when each process is first seen; the result is ``raw/ebpf_symbols.json``, so
a capture directory can be re-reported on a machine without the binaries.

Go frames unwind by frame pointers; C/C++ code built without them (ggml) yields 1-3 frames.
"""

from __future__ import annotations

import os
import re
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


BUCKET_NS = 1_000_000  # a sample's time resolution: the map counts samples per millisecond
FLUSH_ENTRIES = 2000  # samples a map may gather before it is printed (bpftrace's limit: 4096 keys)
MAP_ENTRY = re.compile(r"^@P[01]\[(\d+), (\d+), (\d+), $")  # the first line of a printed entry
MAP_COUNT = re.compile(r"^\]: (\d+)$")  # its last line


def flush_ms(hz: int, cpus: int) -> int:
    """How often a full map is printed: at most :data:`FLUSH_ENTRIES` samples (every CPU busy
    with Ollama's threads) in between, and never more often than 10 times a second."""
    return max(100, min(5000, FLUSH_ENTRIES * 1000 // max(1, hz * cpus)))


def probe(hz: int, process_filter: str, cpus: int | None = None) -> str:
    """The bpftrace clauses; ``process_filter`` is the same predicate as the syscall layer's."""
    key = f"nsecs / {BUCKET_NS}, pid, tid, ustack(perf, {STACK_DEPTH})"
    every = flush_ms(hz, cpus or os.cpu_count() or 1)
    return (f"profile:hz:{hz} /{process_filter}/ {{ if (@pflip) {{ @P1[{key}] = count(); }} "
            f"else {{ @P0[{key}] = count(); }} }}\n"
            f"interval:ms:{every} {{ if (@pflip) {{ @pflip = 0; print(@P1); clear(@P1); }} "
            "else { @pflip = 1; print(@P0); clear(@P0); } }")


# For the program's END: what is left in both maps.
END = "print(@P0); print(@P1); clear(@P0); clear(@P1); clear(@pflip); "


class MapReader:
    """Printed ``@P0``/``@P1`` entries, line by line, back into ``P`` blocks (see the module's
    docstring). :meth:`feed` returns None for a line that is not part of an entry, else the
    blocks it completes (empty until the entry's count line)."""

    def __init__(self) -> None:
        self._key: tuple[int, int, int] | None = None
        self._frames: list[str] = []

    def feed(self, line: str) -> list[str] | None:
        if self._key is None:
            found = MAP_ENTRY.match(line.rstrip("\n"))
            if found is None:
                return None
            bucket, pid, tid = (int(g) for g in found.groups())
            self._key, self._frames = (bucket, pid, tid), []
            return []
        if line.startswith("\t"):
            self._frames.append(line if line.endswith("\n") else line + "\n")
            return []
        counted = MAP_COUNT.match(line.rstrip("\n"))
        bucket, pid, tid = self._key
        self._key = None
        if counted is None:  # a damaged entry: its samples are dropped, the line read again
            return self.feed(line)
        block = f"P {bucket * BUCKET_NS + BUCKET_NS // 2} {pid} {tid}\n\n{''.join(self._frames)}\n"
        return [block] * int(counted.group(1))


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
