"""Ollama's own debug log (``OLLAMA_DEBUG=1``) as timestamped events.

The server and its runners log through Go's slog TextHandler: ``key=value`` pairs with Go-quoted
values and RFC3339 timestamps at millisecond precision (reference §5). The collector notes the
log's size when the capture starts and copies what was appended when it stops into
``raw/ollama.log``; nothing is parsed while the workload runs.

The file is the server's stderr as written (``ollama serve 2> FILE``), or a container's log in
Docker's json-file format (``docker inspect -f '{{.LogPath}}' CONTAINER``), whose lines are
unwrapped. A system service's journal is ``collectors.journald``, into the same raw file.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ollama_tracer import capture_files
from ollama_tracer.capture_files import OLLAMA_LOG as RAW_LOG
from ollama_tracer.clock import ClockModel, parse_created_at
from ollama_tracer.collectors.base import SessionInfo
from ollama_tracer.vocabulary import LLAMA_SERVER

# What the log source reads. Without --record-content only these lines (and warnings and errors)
# are kept: at TRACE Ollama logs whole prompts, and "hit stop token" carries completion text.
BOUNDARY_MESSAGES = ("evaluating already loaded", "completion request", "loading cache slot", "starting runner",
                     "llama runner started", "context for request finished", "loading first model",
                     "llama-server completion request")
# llama-server's own lines (Ollama v0.30+ relays them into its log) have no time and no prefix. Only
# these, which hold numbers and names but no text, are kept without --record-content; each is placed
# at the time of the Ollama line before it (a lower bound: they say what happened, not when).
LLAMA_SERVER_LINE = re.compile(r"^slot\s+\S+: id\s+(?P<slot>\d+) \| task (?P<task>-?\d+) \| (?P<msg>.*)$")
LLAMA_SERVER_FACTS = {
    "selected slot": re.compile(r"^selected slot by (?P<by>LCP similarity|LRU)\b[\w ,.=()>-]*$"),
    "processing task": re.compile(r"^processing task, is_child = \d+$"),
    "new prompt": re.compile(r"^new prompt, n_ctx_slot = \d+, n_keep = \d+, task\.n_tokens = (?P<prompt_tokens>\d+)$"),
    "cached tokens": re.compile(r"^cached n_tokens = (?P<cached_tokens>\d+), memory_seq_rm \[\d+, end\)$"),
    "prompt eval time": re.compile(r"^prompt eval time = +(?P<prompt_eval_ms>[\d.]+) ms / +(?P<evaluated>\d+) tokens"
                                   r" \( *[\d.]+ ms per token, +[\d.]+ tokens per second\)$"),
    "stop processing": re.compile(r"^stop processing: n_tokens = (?P<n_tokens>\d+), truncated = \d+$"),
}
_PAIR = re.compile(r'([A-Za-z0-9_.\-]+|"[^"]*")=("(?:[^"\\]|\\.)*"|\S*)')


@dataclass(frozen=True)
class LogEvent:
    time_ns: int
    level: str
    source: str
    msg: str
    attrs: dict[str, str] = field(default_factory=dict, compare=False)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        # Go's quoting keeps printable non-ASCII as it is: escape it first, or unicode_escape reads its UTF-8
        # bytes as latin-1 ("café" → "cafÃ©").
        return value[1:-1].encode("ascii", "backslashreplace").decode("unicode_escape", errors="replace")
    return value


def parse_line(line: str) -> LogEvent | None:
    """One slog line as an event; None for anything else (gin lines, C logs, garbage)."""
    if not line.startswith("time="):
        return None
    pairs = {_unquote(k): _unquote(v) for k, v in _PAIR.findall(line)}
    try:
        when = parse_created_at(pairs["time"])
    except (KeyError, ValueError):
        return None
    if "msg" not in pairs:
        return None
    attrs = {k: v for k, v in pairs.items() if k not in ("time", "level", "source", "msg")}
    return LogEvent(when, pairs.get("level", ""), pairs.get("source", ""), pairs["msg"], attrs)


def llama_server_fact(line: str) -> tuple[str, dict[str, str]] | None:
    """(fact, its numbers) of one of llama-server's lines that says what it did; None for any other."""
    match = LLAMA_SERVER_LINE.match(line.rstrip("\n"))
    if match is None:
        return None
    for fact, pattern in LLAMA_SERVER_FACTS.items():
        found = pattern.match(match["msg"].strip())
        if found is not None:
            return fact, {"slot": match["slot"], "task": match["task"], **found.groupdict()}
    return None


def unwrap_json_file(raw: bytes) -> bytes:
    """A line of Docker's json-file log (``{"log": "...\\n", "stream": ..., "time": ...}``) as the
    line the server wrote; any other line as it is."""
    if not raw.startswith(b'{"log":'):
        return raw
    try:
        record = json.loads(raw)
    except ValueError:
        return raw
    text = record.get("log") if isinstance(record, dict) else None
    return text.encode("utf-8", errors="replace") if isinstance(text, str) else raw


def keep_without_content(line: str) -> bool:
    event = parse_line(line)
    if event is None:
        return llama_server_fact(line) is not None
    if event.level in ("WARN", "ERROR"):
        return True
    return event.level != "TRACE" and event.msg.startswith(BOUNDARY_MESSAGES)


def parse_log(text: str) -> tuple[list[LogEvent], int]:
    """Events in time order and the number of slog-looking lines that would not parse."""
    events, bad = [], 0
    last_ns = 0  # llama-server's lines take the time of the Ollama line before them
    for line in text.splitlines():
        if not line.startswith("time="):
            fact = llama_server_fact(line)
            if fact is not None:
                events.append(LogEvent(last_ns, "", LLAMA_SERVER, fact[0], fact[1]))
            continue
        event = parse_line(line)
        if event is None:
            bad += 1
        else:
            events.append(event)
            last_ns = event.time_ns
    events.sort(key=lambda e: e.time_ns)  # stable: a llama-server line stays after the line it follows
    return events, bad


class OllamaLogCollector:
    name = "ollama_log"

    def __init__(self, path: Path | None, record_content: bool = False) -> None:
        self.path = path
        self.record_content = record_content
        self._offset = 0
        self._session: SessionInfo | None = None

    def available(self) -> tuple[bool, str]:
        if self.path is None:
            return False, "no Ollama log to read; pass --ollama-log FILE (the server's stderr with OLLAMA_DEBUG=1)"
        if not self.path.is_file():
            return False, f"the Ollama log {self.path} does not exist"
        return True, ""

    def start(self, session: SessionInfo) -> None:
        assert self.path is not None
        self._offset = self.path.stat().st_size
        self._session = session

    def child_started(self, pid: int) -> None:
        pass

    def stop(self) -> dict[str, Any]:
        assert self.path is not None and self._session is not None
        target = self._session.directory / RAW_LOG
        dropped = 0
        with self.path.open("rb") as source, capture_files.open_private(target, "wb") as out:
            source.seek(self._offset)
            dropped = copy_lines((unwrap_json_file(raw) for raw in source), out, self.record_content)
        return {"path": str(self.path), "bytes": target.stat().st_size, "lines_left_out_for_privacy": dropped}


def copy_lines(lines: Iterable[bytes], out: IO[bytes], record_content: bool) -> int:
    """Write the lines a capture may keep; the number left out for privacy."""
    dropped = 0
    for raw in lines:
        if record_content or keep_without_content(raw.decode("utf-8", errors="replace")):
            out.write(raw)
        else:
            dropped += 1
    return dropped


def load_log(directory: Path) -> tuple[list[LogEvent], int]:
    path = directory / RAW_LOG
    if not path.exists():
        return [], 0
    return parse_log(path.read_text(encoding="utf-8", errors="replace"))


@dataclass
class LogRecords:
    """The server's log lines of the capture window, parsed, in time order."""

    events: list[LogEvent]
    unreadable: dict[str, int] = field(default_factory=dict)
    derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # an analysis's, once

    def __post_init__(self) -> None:
        self.events = sorted(self.events, key=lambda e: e.time_ns)  # stable: lines of one time keep their order
        self.times = [e.time_ns for e in self.events]

    def between(self, start_ns: int, end_ns: int) -> list[LogEvent]:
        """The lines with ``start_ns <= time_ns <= end_ns`` (two bisections)."""
        return self.events[bisect.bisect_left(self.times, start_ns):bisect.bisect_right(self.times, end_ns)]


def load(directory: Path, clock: ClockModel | None) -> LogRecords | None:
    """Its timestamps are the server's wall clock, already epoch ns: ``clock`` is not needed."""
    events, bad = load_log(directory)
    return LogRecords(events, {RAW_LOG: bad}) if events else None
