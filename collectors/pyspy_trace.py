"""py-spy's chrometrace read back: its events, the stacks they describe, and the clock markers' lines.

py-spy (``record --subprocesses --idle --nolineno --format chrometrace``) writes ``B``/``E``
events, one per change of a thread's stack, with ``ts`` in µs since its recorder started (see
``collectors.pyspy_clock`` for placing them in epoch time). :func:`build_slices` turns them into
:class:`StackSlice` rows; :func:`parse_markers` reads the clock markers the command's Python
process logged (``ollama_tracer.instrument.clock_marker``). Nothing here raises on file content
except :func:`parse_chrometrace` on a file that is not a JSON array (:class:`ChromeTraceError`).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ollama_tracer.instrument.clock_marker import MARKER_FRAMES

_PROCESS_FRAME = re.compile(r"process (\d+):(.*)", re.DOTALL)  # --subprocesses' root pseudo-frame
_MAX_TS_US = 10**15  # 31 years: anything larger is not a py-spy timestamp


class ChromeTraceError(ValueError):
    """The file is not a Chrome trace (a JSON array of events); the message is one sentence."""


@dataclass(frozen=True)
class ChromeEvent:
    """One ``B`` or ``E`` event of py-spy's chrometrace; ``ts_ns`` is relative to py-spy's start."""

    phase: str
    name: str
    filename: str
    pid: int
    tid: int
    ts_ns: int

    @property
    def frame(self) -> str:
        return frame_label(self.name, self.filename)


@dataclass(frozen=True)
class StackSlice:
    """One thread's Python stack, unchanged from ``start_ns`` to ``end_ns`` (epoch ns).

    ``frames`` run root → leaf, as py-spy names them: ``"function (file.py)"``. Summing
    durations × rate approximates the number of samples that saw the stack.
    """

    start_ns: int
    end_ns: int
    pid: int
    tid: int
    frames: tuple[str, ...]


@dataclass(frozen=True)
class ClockMarker:
    """One ``M pid tid start_ns end_ns`` line: the thread was in the marker frame in between."""

    pid: int
    tid: int
    start_ns: int
    end_ns: int


def as_int(value: Any) -> int | None:
    """``value`` if it is a JSON integer (not a bool, not a float), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def frame_label(name: str, filename: str) -> str:
    return f"{name} ({filename})" if filename else name


def parse_chrometrace(data: bytes | str) -> tuple[list[ChromeEvent], int]:
    """The ``B``/``E`` events of a py-spy chrometrace and the number of events it could not use.

    Metadata (``M``) events are skipped silently; any other phase, or an event with a missing or
    mistyped field, is counted and skipped. Anything that is not a JSON array raises
    :class:`ChromeTraceError`.
    """
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise ChromeTraceError(f"the py-spy trace is not valid JSON ({type(err).__name__}).") from None
    if not isinstance(payload, list):
        raise ChromeTraceError(f"the py-spy trace is a JSON {type(payload).__name__}, not an array of events.")
    events: list[ChromeEvent] = []
    malformed = 0
    for raw in payload:
        event = _event(raw)
        if event is None:
            malformed += not (isinstance(raw, dict) and raw.get("ph") == "M")
        else:
            events.append(event)
    return events, malformed


def _event(raw: Any) -> ChromeEvent | None:
    if not isinstance(raw, dict):
        return None
    phase, name, ts = raw.get("ph"), raw.get("name"), raw.get("ts")
    pid, tid, ts_int = as_int(raw.get("pid")), as_int(raw.get("tid")), as_int(ts)
    if phase not in ("B", "E") or not isinstance(name, str) or pid is None or tid is None:
        return None
    if ts_int is not None:
        ts_ns = ts_int * 1000
    elif isinstance(ts, float) and 0 <= ts <= _MAX_TS_US:  # 1e308 is finite, but not once × 1000
        ts_ns = round(ts * 1000)
    else:
        return None
    if not 0 <= ts_ns <= _MAX_TS_US * 1000:
        return None
    args = raw.get("args")
    filename = args.get("filename", "") if isinstance(args, dict) else ""
    if not isinstance(filename, str):
        return None
    return ChromeEvent(phase=phase, name=name, filename=filename, pid=pid, tid=tid, ts_ns=ts_ns)


@dataclass
class SliceBuild:
    """What :func:`build_slices` made of the events, and what it had to repair or leave out."""

    slices: list[StackSlice] = field(default_factory=list)
    unbalanced: int = 0  # E events with no open frame of that name (skipped)
    implicitly_closed: int = 0  # frames closed because an outer frame ended first
    unterminated: int = 0  # frames still open at the end, closed at the last timestamp
    marker_slices: int = 0  # clock-marker thread slices, left out
    processes: dict[int, str] = field(default_factory=dict)  # pid → command line (--subprocesses)


def build_slices(events: list[ChromeEvent], offset_ns: int) -> SliceBuild:
    """One slice per maximal stretch of unchanged stack on each (pid, tid), in epoch ns.

    Between two events of a thread its stack is constant (py-spy emits events only on change);
    zero-length stacks between an ``E`` and a ``B`` at the same timestamp are skipped. The clock
    marker's thread is left out so it does not pollute the program's stacks.
    """
    result = SliceBuild()
    if not events:
        return result
    last_ts = max(event.ts_ns for event in events)
    threads: dict[tuple[int, int], list[ChromeEvent]] = defaultdict(list)
    for event in events:
        threads[(event.pid, event.tid)].append(event)
    for (pid, tid), thread_events in threads.items():
        thread_events.sort(key=lambda e: e.ts_ns)  # stable: same-ts E-before-B order survives
        stack: list[tuple[str, str]] = []
        current_ts = thread_events[0].ts_ns
        for event in thread_events:
            if event.ts_ns > current_ts:
                _emit(result, pid, tid, stack, current_ts, event.ts_ns, offset_ns)
                current_ts = event.ts_ns
            if event.phase == "B":
                stack.append((event.name, event.filename))
                continue
            depth = _find_open(stack, event.name, event.filename)
            if depth is None:
                result.unbalanced += 1
            else:
                result.implicitly_closed += len(stack) - depth - 1
                del stack[depth:]
        _emit(result, pid, tid, stack, current_ts, last_ts, offset_ns)
        result.unterminated += len(stack)
    result.slices.sort(key=lambda s: (s.start_ns, s.pid, s.tid))
    return result


def _find_open(stack: list[tuple[str, str]], name: str, filename: str) -> int | None:
    for depth in range(len(stack) - 1, -1, -1):
        if stack[depth] == (name, filename):
            return depth
    return None


def _emit(result: SliceBuild, pid: int, tid: int, stack: list[tuple[str, str]], start_ts: int, end_ts: int,
          offset_ns: int) -> None:
    if not stack or end_ts <= start_ts:
        return
    if any(name in MARKER_FRAMES for name, _ in stack):
        result.marker_slices += 1
        return
    frames = stack
    pseudo = _PROCESS_FRAME.fullmatch(stack[0][0]) if not stack[0][1] else None
    if pseudo is not None:
        result.processes.setdefault(pid, pseudo.group(2).strip().strip('"'))
        frames = stack[1:]
        if not frames:
            return
    labels = tuple(frame_label(name, filename) for name, filename in frames)
    start_ns, end_ns = start_ts + offset_ns, end_ts + offset_ns
    previous = result.slices[-1] if result.slices else None
    if (previous is not None and previous.pid == pid and previous.tid == tid and previous.end_ns == start_ns
            and previous.frames == labels):
        result.slices[-1] = StackSlice(previous.start_ns, end_ns, pid, tid, labels)
    else:
        result.slices.append(StackSlice(start_ns, end_ns, pid, tid, labels))


def parse_markers(text: str) -> tuple[list[ClockMarker], int]:
    """The ``M`` lines of the marker file and the number of unreadable ones.

    Other lines (``pid time_ns monotonic_ns``, one per instrumented process) are not markers and
    are not counted as bad; a torn last line after a kill is.
    """
    markers: list[ClockMarker] = []
    bad = 0
    for line in text.splitlines():
        if not line.startswith("M"):
            continue
        parts = line.split()
        if len(parts) != 5 or parts[0] != "M":
            bad += 1
            continue
        try:
            pid, tid, start_ns, end_ns = (int(part) for part in parts[1:])
        except ValueError:
            bad += 1
            continue
        if end_ns < start_ns:
            bad += 1
            continue
        markers.append(ClockMarker(pid=pid, tid=tid, start_ns=start_ns, end_ns=end_ns))
    return markers, bad
