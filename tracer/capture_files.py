"""The files of a capture directory: their names, and the writers and readers every part uses.

Files are user-only (0600 in a 0700 directory) from the moment they exist. Writers keep what
they could write when the disk fills; readers turn a missing or corrupt file into one sentence.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from ollama_tracer.errors import ExitCode, TracerError

# What a capture directory holds, relative to it. Every file name of the project is here.
CAPTURE_JSON = "capture.json"  # versions, command, clocks, collectors (ollama_tracer.capture.directory)
ATTRIBUTION_JSON = "attribution.json"
SPANS_JSONL = "spans.jsonl"
PERFETTO_JSON = "trace.perfetto.json"
REPORT_HTML = "report.html"
EXPORT_JSON = "export.json"  # the last `tracer export`'s outcome
BENCH_JSON = "bench.json"  # `tracer bench --json` inside a capture directory
RAW_DIR = "raw"  # the collectors' own records: everything else is recomputed from them
CLIENT_SPANS = "raw/client_spans.jsonl"  # OTLP receiver (collectors.otlp)
EBPF_EVENTS = "raw/ebpf_events.txt"  # bpftrace's stdout: probe events and stack samples (collectors.ebpf)
EBPF_STDERR = "raw/ebpf_stderr.txt"
EBPF_SCRIPT = "raw/ebpf_script.bt"  # the program as run, with the capture's pids and addresses
EBPF_META = "raw/ebpf_meta.json"
EBPF_SYMBOLS = "raw/ebpf_symbols.json"  # sampled addresses resolved (collectors.ebpf_profile)
EBPF_MAPS = "raw/ebpf_maps.json"
OLLAMA_LOG = "raw/ollama.log"  # collectors.ollama_log
GPU_SAMPLES = "raw/gpu_samples.jsonl"  # collectors.nvml
GPU_META = "raw/gpu_meta.json"
PYSPY_TRACE = "raw/pyspy.chrometrace.json"  # collectors.pyspy
PYSPY_STDERR = "raw/pyspy_stderr.txt"
PYSPY_META = "raw/pyspy_meta.json"
MARKERS = "raw/markers.txt"  # clock markers written by the instrumented children
PROXY_STATS = "raw/proxy_stats.json"  # tracer proxy's own latency counters
OUTPUTS = (CAPTURE_JSON, ATTRIBUTION_JSON, SPANS_JSONL, PERFETTO_JSON, REPORT_HTML, EXPORT_JSON, BENCH_JSON, RAW_DIR)


def _open_private(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)


def open_private(path: Path, mode: str = "w") -> Any:
    """Open a capture file for writing, user-only (0600) from the moment it exists."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, 0o600), mode, encoding=None if "b" in mode else "utf-8")


def write_text(path: Path, text: str) -> None:
    """Write atomically: a reader (or a crash) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with os.fdopen(_open_private(tmp), "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if is_disk_full(err):
            raise TracerError(f"the disk holding {path.parent} is full, so {path.name} could not be written; what "
                              "was written before is kept: free some space and rerun, or choose another -o.",
                              ExitCode.DISK_FULL) from err
        raise TracerError(f"could not write {path} ({err.strerror}); free some disk space or choose another -o.",
                          ExitCode.FAILURE) from err


def is_disk_full(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


class RawWriter:
    """A collector's raw file that keeps whatever it could write. On a write error (a full disk)
    it stops writing, counts the lines it drops, and remembers why; the collector goes on, and the
    capture ends with that error instead of a crash mid-way."""

    def __init__(self, path: Path, mode: str = "w") -> None:
        self.path = path
        self._out = open_private(path, mode)
        self.lost = 0
        self.error: str | None = None
        self.disk_full = False

    def write(self, text: str) -> None:
        if self.error is not None:
            self.lost += 1
            return
        try:
            self._out.write(text)
        except OSError as err:
            self._failed(err)
            self.lost += 1

    def flush(self) -> None:
        if self.error is None:
            try:
                self._out.flush()
            except OSError as err:
                self._failed(err)

    def _failed(self, err: OSError) -> None:
        self.error = f"writing {self.path.name} failed: {err.strerror}"
        self.disk_full = is_disk_full(err)

    def close(self) -> None:
        self.flush()
        try:
            self._out.close()
        except OSError as err:  # the buffered tail could not be written either
            if self.error is None:
                self._failed(err)

    def stats(self) -> dict[str, Any]:
        return {"lost": self.lost, **({"write_error": self.error, "disk_full": self.disk_full} if self.error else {})}


def json_text(payload: Any) -> str:
    """``payload`` as indented JSON. The standard library's encoder runs in Python once it
    indents (4.9 s for a 1,000-interval attribution here); orjson does the same in C. What
    orjson refuses (an integer wider than 64 bits, a type it does not know) goes the slow way."""
    try:
        return orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(payload, indent=2, sort_keys=False)


def write_json(path: Path, payload: Any) -> None:
    write_text(path, json_text(payload) + "\n")


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    write_text(path, "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows))


class JsonlAppender:
    """Append rows as they arrive and flush each batch, so a killed capture keeps what it had."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._out = RawWriter(path, "a")
        self.rows = 0

    def append(self, rows: Iterable[Any]) -> None:
        for row in rows:
            self._out.write(json.dumps(row, separators=(",", ":")) + "\n")
            self.rows += 1
        self._out.flush()

    @property
    def lost(self) -> int:
        return self._out.lost

    def stats(self) -> dict[str, Any]:
        return self._out.stats()

    def close(self) -> None:
        self._out.close()


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TracerError(f"{path} is missing: {path.parent} is not a complete capture ({what}).",
                          ExitCode.BAD_CAPTURE) from None
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise TracerError(f"{path} is corrupt ({err}); re-run the capture.", ExitCode.BAD_CAPTURE) from None
    except OSError as err:  # a directory in its place, or not ours to read
        raise TracerError(f"{path} could not be read ({err.strerror}); check its permissions, or re-run the capture.",
                          ExitCode.BAD_CAPTURE) from None
    if not isinstance(raw, dict):
        raise TracerError(f"{path} is corrupt (not a JSON object); re-run the capture.", ExitCode.BAD_CAPTURE)
    return raw


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object file read where a bad one is as good as none (a cache, an optional meta): None
    when it is missing, unreadable, not JSON or not an object."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return raw if isinstance(raw, dict) else None


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Rows of a JSONL file and the number of unreadable lines (a torn last line after a kill)."""
    rows: list[dict[str, Any]] = []
    bad = 0
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the interpreter's stack
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad
