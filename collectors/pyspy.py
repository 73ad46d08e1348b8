"""Python stacks over time: py-spy samples the captured command (and its Python children).

py-spy runs beside the command (``record --subprocesses --idle --nolineno --format chrometrace``)
and writes ``raw/pyspy.chrometrace.json`` when it exits. Its ``ts`` are µs since py-spy's
recorder started, on a monotonic clock, with no epoch anchor in the file, so the capture makes
its own. The command's Python process runs a clock-marker thread (``tracer.autoinstrument``)
that sits in ``_tracer_clock_marker`` between two logged ``time_ns()`` readings. The first
sample that shows that frame, and the first that no longer does, bound py-spy's offset to epoch
time. Without markers (a non-Python command, attach mode) the anchor is ``time_ns()`` taken just
before py-spy was launched, good to about ±8 ms.

py-spy's sampling is a Poisson process: the gaps between samples are exponential with mean
1/rate (src/timer.rs, to avoid aliasing), not a fixed period. So an edge tells us only that
py-spy saw the change *after* it happened, by an exponential lag. Each edge gives a hard lower
bound on the offset; the sharpest of n of them is above the truth by the smallest of n lags,
which is exponential with mean period/n. A ``B`` also gives a hard upper bound, because the
sample that saw the frame came before the frame ended. :func:`align` takes the consensus of all
edges (mis-paired or late ones are outvoted) and reports the midpoint and half-width of
[max lower, min(hard upper, max lower + ln(100)·period/n + recording latency)]: a 99 % interval.

:func:`load_stacks` turns the trace back into :class:`StackSlice` rows in epoch ns. It reads only
the capture directory and survives any file content: a bad file becomes an error in the meta,
never an exception.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sysconfig
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ollama_tracer import capture_files, system
from ollama_tracer.autoinstrument import ENV_PYSPY_MARKER, _tracer_clock_marker, _tracer_clock_marker_loop
from ollama_tracer.capture_files import open_private, write_json
from ollama_tracer.clock import ClockModel
from ollama_tracer.collectors.base import SessionInfo
from ollama_tracer.doctor_checks import check_pyspy
from ollama_tracer.errors import ExitCode, TracerError

META_SCHEMA = "tracer.pyspy/1"
RAW_TRACE = capture_files.PYSPY_TRACE
RAW_STDERR = capture_files.PYSPY_STDERR  # py-spy's stdout and stderr: its summary line is on stdout
RAW_META = capture_files.PYSPY_META
RAW_MARKERS = capture_files.MARKERS  # written by the command's auto-instrumentation (the capture creates it)

MARKER_FUNCTION = _tracer_clock_marker.__name__
MARKER_LOOP_FUNCTION = _tracer_clock_marker_loop.__name__
MARKER_FRAMES = frozenset({MARKER_FUNCTION, MARKER_LOOP_FUNCTION})

PTRACE_FIX = ("run tracer as root, grant py-spy CAP_SYS_PTRACE (`sudo setcap cap_sys_ptrace+ep "
              "$(readlink -f $(which py-spy))`), or `sudo sysctl kernel.yama.ptrace_scope=1`")
LAUNCH_ERROR_NS = 8_000_000  # time_ns() before launching py-spy vs its recorder's start (reference: ±8 ms)
RECORD_LATENCY_NS = 500_000  # a sample's timestamp is taken after the stack was read: allow this much
MARKER_PAIR_WINDOW_NS = 90_000_000  # markers start >= 225 ms apart; the launch anchor is good to ~10 ms
MAX_MARKER_NS = 1_000_000_000  # a marker held longer than this (a stalled process) is not looked for
LAG_QUANTILE = math.log(100)  # P(smallest of n exponential lags > q·period/n) = e^-q = 1 %
MAX_RESIDUALS = 64
NATURAL_EXIT_S = 2.0  # py-spy stops by itself when its target exits; give it this long to write the file
SIGINT_WAIT_S = 10.0
RETRY_S = 0.5

_SUMMARY = re.compile(r"Samples: (\d+) Errors: (\d+)")
_LAGGING = re.compile(r"behind in sampling")
_PERMISSION = re.compile(r"permission denied|operation not permitted|os error 1\b|EPERM", re.IGNORECASE)
_NO_PYTHON = "No python processes found"
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


@dataclass(frozen=True)
class Alignment:
    """``epoch_ns = ts_ns + offset_ns``, known to within ``error_ns`` either way."""

    method: str  # "marker" or "launch"
    offset_ns: int
    error_ns: int
    markers_used: int = 0
    edges_used: int = 0
    edges_rejected: int = 0
    residuals_ns: tuple[int, ...] = ()  # per used edge: how long after the logged edge py-spy saw it
    launch_minus_marker_ns: int | None = None  # how far off the launch anchor would have been

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["residuals_ns"] = list(self.residuals_ns[:MAX_RESIDUALS])
        return payload

    @classmethod
    def from_json(cls, payload: Any) -> Alignment | None:
        """The alignment stored in the meta, or None if it is missing or not well-formed."""
        if not isinstance(payload, dict):
            return None
        method, offset, error = payload.get("method"), _as_int(payload.get("offset_ns")), \
            _as_int(payload.get("error_ns"))
        if method not in ("marker", "launch") or offset is None or error is None:
            return None
        residuals = payload.get("residuals_ns")
        return cls(method=str(method), offset_ns=offset, error_ns=error,
                   markers_used=_as_int(payload.get("markers_used")) or 0,
                   edges_used=_as_int(payload.get("edges_used")) or 0,
                   edges_rejected=_as_int(payload.get("edges_rejected")) or 0,
                   residuals_ns=tuple(r for r in map(_as_int, residuals) if r is not None)
                   if isinstance(residuals, list) else (),
                   launch_minus_marker_ns=_as_int(payload.get("launch_minus_marker_ns")))


def _as_int(value: Any) -> int | None:
    """``value`` if it is a JSON integer (not a bool, not a float), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def frame_label(name: str, filename: str) -> str:
    return f"{name} ({filename})" if filename else name


# --- reading --------------------------------------------------------------------------------


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
    pid, tid, ts_int = _as_int(raw.get("pid")), _as_int(raw.get("tid")), _as_int(ts)
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


Sighting = tuple[int, int, int, int | None]  # (pid, tid, B ts_ns, E ts_ns or None), see observed_markers


def observed_markers(events: list[ChromeEvent]) -> list[Sighting]:
    """Marker frames py-spy saw: (pid, tid, B ts_ns, E ts_ns or None when the E is unusable).

    An ``E`` at the trace's last timestamp is py-spy closing every open frame when it wrote the
    file, not a sample that saw the frame end.
    """
    if not events:
        return []
    last_ts = max(event.ts_ns for event in events)
    open_at: dict[tuple[int, int], int] = {}
    seen: list[Sighting] = []
    for event in sorted(events, key=lambda e: e.ts_ns):
        if event.name != MARKER_FUNCTION:
            continue
        key = (event.pid, event.tid)
        if event.phase == "B":
            open_at[key] = event.ts_ns
        elif key in open_at:
            begin = open_at.pop(key)
            seen.append((event.pid, event.tid, begin, event.ts_ns if event.ts_ns < last_ts else None))
    seen.extend((pid, tid, begin, None) for (pid, tid), begin in open_at.items())
    return seen


def align(events: list[ChromeEvent], markers: list[ClockMarker], *, rate_hz: int,
          launch_epoch_ns: int) -> Alignment:
    """py-spy's offset to epoch from the clock markers, or the launch anchor if there are none."""
    # Each constraint: (lower, upper or None, logged edge time, py-spy ts, marker index).
    constraints: list[tuple[int, int | None, int, int, int]] = []
    pairs, unpaired_edges = _pair_sightings(observed_markers(events), markers, launch_epoch_ns)
    for (_, _, begin_ts, end_ts), index in pairs:
        marker = markers[index]
        constraints.append((marker.start_ns - begin_ts, marker.end_ns - begin_ts + RECORD_LATENCY_NS,
                            marker.start_ns, begin_ts, index))
        if end_ts is not None:
            constraints.append((marker.end_ns - end_ts, None, marker.end_ns, end_ts, index))
    if not constraints:
        return Alignment(method="launch", offset_ns=launch_epoch_ns, error_ns=LAUNCH_ERROR_NS)
    point = _most_covered([(c[0], c[1]) for c in constraints])
    kept = [c for c in constraints if c[0] <= point and (c[1] is None or point <= c[1])]
    lower = max(c[0] for c in kept)
    period_ns = 1_000_000_000 // max(rate_hz, 1)
    upper = lower + math.ceil(LAG_QUANTILE * period_ns / len(kept)) + RECORD_LATENCY_NS
    upper = min([upper, *(c[1] for c in kept if c[1] is not None)])
    offset = (lower + upper) // 2
    return Alignment(method="marker", offset_ns=offset, error_ns=(upper - lower + 1) // 2,
                     markers_used=len({c[4] for c in kept}), edges_used=len(kept),
                     edges_rejected=len(constraints) - len(kept) + unpaired_edges,
                     residuals_ns=tuple(ts + offset - logged for _, _, logged, ts, _ in kept),
                     launch_minus_marker_ns=launch_epoch_ns - offset)


def _pair_sightings(sightings: list[Sighting], markers: list[ClockMarker],
                    launch_epoch_ns: int) -> tuple[list[tuple[Sighting, int]], int]:
    """Which logged marker each sighting is: the pairing under which the most sightings fit.

    Seeing marker m at ``B`` is possible only for offsets in [m.start - B, m.end - B]. The offset
    the most (sighting, marker) candidates allow picks one marker per sighting, so one early
    sighting cannot shift the pairing of all later ones. Candidates lie within
    MARKER_PAIR_WINDOW_NS of the launch anchor, under half the marker spacing, so a pairing
    shifted by a whole marker cannot win. Also returns the number of edges of sightings that had
    candidates but fit none (a sighting with no logged marker near it, such as the marker a
    process was in when it exited, is not counted).
    """
    pools: dict[tuple[int, int], list[int]] = defaultdict(list)
    for position, logged in sorted(enumerate(markers), key=lambda pair: pair[1].start_ns):
        pools[(logged.pid, logged.tid)].append(position)
        pools[(logged.pid, -1)].append(position)
    starts = {key: [markers[i].start_ns for i in pool] for key, pool in pools.items()}
    candidates: list[tuple[int, int, int, int]] = []  # (lower, upper, sighting index, marker index)
    for number, (pid, tid, begin_ts, _) in enumerate(sightings):
        key = (pid, tid) if (pid, tid) in pools else (pid, -1)  # newer py-spy renumbers threads
        estimate = begin_ts + launch_epoch_ns
        pool, pool_starts = pools.get(key, []), starts.get(key, [])
        first = bisect.bisect_left(pool_starts, estimate - MARKER_PAIR_WINDOW_NS - MAX_MARKER_NS)
        last = bisect.bisect_right(pool_starts, estimate + MARKER_PAIR_WINDOW_NS)
        for index in pool[first:last]:
            marker = markers[index]
            if marker.start_ns - MARKER_PAIR_WINDOW_NS <= estimate <= marker.end_ns + MARKER_PAIR_WINDOW_NS:
                candidates.append((marker.start_ns - begin_ts, marker.end_ns - begin_ts + RECORD_LATENCY_NS,
                                   number, index))
    if not candidates:
        return [], 0
    point = _most_covered([(c[0], c[1]) for c in candidates])
    chosen: dict[int, int] = {}
    taken: set[int] = set()
    for lower, upper, number, index in sorted(candidates, key=lambda c: abs((c[0] + c[1]) // 2 - point)):
        if lower <= point <= upper and number not in chosen and index not in taken:
            chosen[number] = index
            taken.add(index)
    unpaired = {number for _, _, number, _ in candidates} - chosen.keys()
    unpaired_edges = sum(1 + (sightings[number][3] is not None) for number in unpaired)
    return [(sightings[number], index) for number, index in sorted(chosen.items())], unpaired_edges


def _most_covered(intervals: list[tuple[int, int | None]]) -> int:
    """The smallest point inside the most intervals (closed; None: no upper bound)."""
    sweep: list[tuple[int, int]] = []
    for lower, upper in intervals:
        sweep.append((lower, 0))  # opening sorts before closing at the same point: bounds are inclusive
        if upper is not None:
            sweep.append((upper, 1))
    sweep.sort()
    best_count, best_point, count = -1, sweep[0][0], 0
    for point, kind in sweep:
        count += 1 if kind == 0 else -1
        if kind == 0 and count > best_count:
            best_count, best_point = count, point
    return best_point


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError):
        return {"meta_error": f"{path.name} is not valid JSON"}
    return payload if isinstance(payload, dict) else {"meta_error": f"{path.name} is not a JSON object"}


@dataclass
class PythonStacks:
    """py-spy's stack slices of the client processes, in epoch ns, and the collector's meta (alignment)."""

    slices: list[StackSlice]
    meta: dict[str, Any]
    unreadable: dict[str, int] = field(default_factory=dict)

    @property
    def rate_hz(self) -> float:
        return float(self.meta.get("rate_hz", 100))


def load(directory: Path, clock: ClockModel | None) -> PythonStacks | None:
    """py-spy's clock is aligned by its own markers (``meta["alignment"]``): ``clock`` is not needed."""
    if not (directory / RAW_META).exists():
        return None
    slices, meta, bad = load_stacks(directory)
    return PythonStacks(slices, meta, {RAW_TRACE: bad})


def load_stacks(directory: Path) -> tuple[list[StackSlice], dict[str, Any], int]:
    """The capture's py-spy stacks in epoch ns, the py-spy meta (with ``alignment``), and the number
    of events that could not be used (malformed or unbalanced).

    Never raises on file content: a missing or unreadable trace gives no slices and says why in
    ``meta["error"]``. The alignment stored at capture time is used; a capture killed before py-spy's
    collector stopped has none, so it is recomputed here from the trace and the markers.
    """
    meta = _read_meta(directory / RAW_META)
    # What attribution reads from the meta is well-formed or left out (and said so), whatever happens below.
    if meta.get("alignment") is not None and Alignment.from_json(meta["alignment"]) is None:
        meta["alignment"] = None
        meta["meta_error"] = f"{RAW_META} has a malformed alignment, which was left out"
    rate = _as_int(meta.get("rate_hz"))
    if "rate_hz" in meta and not (rate is not None and 0 < rate < 2**32):
        del meta["rate_hz"]
        meta["meta_error"] = f"{RAW_META} has a malformed rate_hz, which was left out"
    try:
        data = (directory / RAW_TRACE).read_bytes()
    except OSError:
        data = b""
    if not data.strip():
        if meta:
            meta["error"] = "py-spy wrote no stacks"
        return [], meta, 0
    try:
        events, malformed = parse_chrometrace(data)
    except ChromeTraceError as err:
        meta["error"] = str(err)
        return [], meta, 0
    alignment = Alignment.from_json(meta.get("alignment"))
    if alignment is None:
        launch = _as_int(meta.get("launch_epoch_ns"))
        rate = _as_int(meta.get("rate_hz"))
        if launch is None:
            meta["error"] = "the py-spy meta has no launch time, so its stacks cannot be placed in time"
            return [], meta, malformed
        try:
            markers_text = (directory / RAW_MARKERS).read_text(encoding="utf-8", errors="replace")
        except OSError:
            markers_text = ""
        markers, _ = parse_markers(markers_text)
        alignment = align(events, markers, rate_hz=rate if rate is not None and rate > 0 else 100,
                          launch_epoch_ns=launch)
        meta["alignment"] = alignment.to_json()
    build = build_slices(events, alignment.offset_ns)
    meta.update({
        "events": len(events),
        "malformed_events": malformed,
        "unbalanced_events": build.unbalanced,
        "implicitly_closed_frames": build.implicitly_closed,
        "unterminated_frames": build.unterminated,
        "marker_slices_excluded": build.marker_slices,
        "processes": {str(pid): cmdline for pid, cmdline in build.processes.items()},
    })
    return build.slices, meta, malformed + build.unbalanced


# --- collecting -----------------------------------------------------------------------------


def pyspy_binary() -> str | None:
    """The py-spy next to this interpreter (not a version-manager shim, whose start-up delays the anchor)."""
    beside = Path(sysconfig.get_path("scripts")) / "py-spy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


def diagnose(output: str, pid: int) -> str:
    """One sentence (with the fix) for a py-spy run that ended without writing stacks."""
    if _PERMISSION.search(output):
        return f"py-spy may not read process {pid} (permission denied); {PTRACE_FIX}."
    if _NO_PYTHON in output:
        if not system.has_capability(system.CAP_SYS_PTRACE):
            return (f"py-spy found no Python process it may read in {pid} or its children; if the command is "
                    f"Python, {PTRACE_FIX}.")
        return f"py-spy found no Python process in {pid} or its children: the command ran no Python while sampled."
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith(" ")]
    detail = next((line for line in lines if line.startswith("Error")), lines[-1] if lines else "no output")
    return f"py-spy stopped without writing stacks ({detail[:200]}); see {RAW_STDERR}."


class PySpyCollector:
    """Sample the command's Python stacks (or an existing process with ``attach_pid``) with py-spy."""

    name = "pyspy"

    def __init__(self, rate_hz: int = 100, *, attach_pid: int | None = None) -> None:
        self.rate_hz = rate_hz
        self.attach_pid = attach_pid
        self._session: SessionInfo | None = None
        self._binary: str | None = None
        self._target: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._argv: list[str] = []
        self._launch_epoch_ns: int | None = None
        self._attempts = 0
        self._attempt_offset = 0  # where the current attempt's output starts in the stderr file
        self._errors: list[str] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def available(self) -> tuple[bool, str]:
        self._binary = pyspy_binary()
        if self._binary is None:
            return False, "py-spy is not installed; `pip install py-spy`"
        check = check_pyspy()
        if check.status == "fail":
            return False, f"{check.detail}; {check.fix}."
        if not check.ok:
            return False, f"{check.detail}; {PTRACE_FIX}."
        if not system.has_capability(system.CAP_SYS_PTRACE) and system.ptrace_scope() == 1:
            # Yama scope 1 allows tracing descendants only, and py-spy is the command's sibling.
            return False, ("kernel.yama.ptrace_scope=1 lets py-spy trace only its own descendants, and the command "
                           "is not one; run tracer as root, grant py-spy CAP_SYS_PTRACE, or "
                           "`sudo sysctl kernel.yama.ptrace_scope=0`.")
        return True, ""

    def start(self, session: SessionInfo) -> None:
        self._session = session
        if self._binary is None:
            self._binary = pyspy_binary()
        if self._binary is None:
            raise TracerError("py-spy is not installed; `pip install py-spy`.", ExitCode.MISSING_DEPENDENCY)
        if self.attach_pid is None:
            session.child_env[ENV_PYSPY_MARKER] = "1"
        else:
            self._begin(self.attach_pid)

    def child_started(self, pid: int) -> None:
        if self.attach_pid is None and self._session is not None:
            self._begin(pid)

    def _begin(self, pid: int) -> None:
        self._target = pid
        with self._lock:
            self._launch()
        self._watcher = threading.Thread(target=self._watch, name="pyspy-watch", daemon=True)
        self._watcher.start()

    def _launch(self) -> None:
        """Start (or restart) py-spy on the target; the caller holds the lock."""
        assert self._session is not None and self._binary is not None and self._target is not None
        raw = self._session.raw_dir
        trace = self._session.directory / RAW_TRACE
        with open_private(trace, "wb"):
            pass  # py-spy truncates the file and keeps its mode: the trace is 0600 from the start
        self._argv = [self._binary, "record", "--subprocesses", "--idle", "--nolineno", "--format", "chrometrace",
                      "-r", str(self.rate_hz), "-o", str(trace), "--pid", str(self._target)]
        stderr_path = raw / Path(RAW_STDERR).name
        with open_private(stderr_path, "ab") as out:
            self._attempt_offset = out.tell()
            self._launch_epoch_ns = time.time_ns()
            try:
                # Its own session: the terminal's Ctrl-C goes to the command; py-spy stops when we say.
                self._proc = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                              start_new_session=True)
            except OSError as err:
                raise TracerError(f"could not start py-spy ({err.strerror}); reinstall it with `pip install py-spy`.",
                                  ExitCode.MISSING_DEPENDENCY) from err
        self._attempts += 1
        self._write_meta(None)

    def _attempt_output(self) -> str:
        assert self._session is not None
        path = self._session.directory / RAW_STDERR
        try:
            with open(path, "rb") as out:
                out.seek(self._attempt_offset)
                return out.read(65_536).decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _watch(self) -> None:
        """Relaunch py-spy while the command has not started Python yet (a shell script, say).

        py-spy gives up after about a second without a Python process; the command may start one
        later. Only the first failed attempt's output is kept, so the stderr file stays small.
        """
        while True:
            proc = self._proc
            if proc is None:
                return
            proc.wait()
            output = self._attempt_output()
            target = self._target
            if (self._stopping.is_set() or _NO_PYTHON not in output or target is None or not _alive(target)
                    or self._trace_written()):
                return
            if self._attempts > 1:
                self._truncate_output()
            if self._stopping.wait(RETRY_S):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._launch()
                except TracerError as err:
                    self._errors.append(err.message)
                    return

    def _truncate_output(self) -> None:
        assert self._session is not None
        with contextlib.suppress(OSError):
            os.truncate(self._session.directory / RAW_STDERR, self._attempt_offset)

    def _trace_written(self) -> bool:
        assert self._session is not None
        try:
            return (self._session.directory / RAW_TRACE).stat().st_size > 0
        except OSError:
            return False

    def stop(self) -> dict[str, Any]:
        self._stopping.set()
        with self._lock:
            proc = self._proc
        stats: dict[str, Any] = {"mode": "attach" if self.attach_pid is not None else "child",
                                 "target_pid": self._target, "rate_hz": self.rate_hz, "attempts": self._attempts}
        if proc is None or self._session is None:
            stats["errors"] = [*self._errors, "py-spy did not run: no command was started and no pid to attach to"]
            return stats
        stopped_by = self._finish(proc)
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        output = self._attempt_output()
        summary = _SUMMARY.search(output)
        written = self._trace_written()
        # Lost: py-spy had sampled (or may have) but wrote nothing. A command that never ran Python lost nothing.
        lost = stopped_by == "sigkill" or (not written and _NO_PYTHON not in output)
        if stopped_by == "sigkill":
            self._errors.append(f"py-spy did not exit {SIGINT_WAIT_S:.0f} s after SIGINT and was killed: "
                                "its stacks are lost (it writes them only on exit)")
        elif not written:
            self._errors.append(diagnose(output, self._target or 0))
        stats.update({
            "stopped_by": stopped_by,
            "exit_code": proc.returncode,
            "stacks_lost": lost,
            "samples": int(summary.group(1)) if summary else None,
            "dropped": int(summary.group(2)) if summary else 0,  # samples py-spy failed to read
            "lag_warnings": len(_LAGGING.findall(output)),
        })
        alignment = None
        if written and not lost:
            with contextlib.suppress(OSError):
                os.chmod(self._session.directory / RAW_TRACE, 0o600)
            slices, meta, bad = self._align_and_count()
            alignment = Alignment.from_json(meta.get("alignment"))
            stats.update({"events": meta.get("events", 0), "slices": len(slices), "malformed_events": bad})
            if "error" in meta:
                self._errors.append(str(meta["error"]))
        stats["alignment"] = alignment.to_json() if alignment is not None else None
        stats["errors"] = list(self._errors)
        self._write_meta(alignment, stats)
        return stats

    def _finish(self, proc: subprocess.Popen[bytes]) -> str:
        """Let py-spy write its file: by itself if the target is gone, else on SIGINT; kill as the last resort."""
        target_gone = self._target is None or not _alive(self._target)
        if target_gone:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=NATURAL_EXIT_S)
                return "exit"
        if proc.poll() is not None:
            return "exit"
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=SIGINT_WAIT_S)
            return "sigint"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return "sigkill"

    def _align_and_count(self) -> tuple[list[StackSlice], dict[str, Any], int]:
        """Compute the alignment once, at the end, and store it with the meta for attribution."""
        assert self._session is not None
        self._write_meta(None)  # no stored alignment: load_stacks computes it from trace + markers
        return load_stacks(self._session.directory)

    def _write_meta(self, alignment: Alignment | None, stats: dict[str, Any] | None = None) -> None:
        assert self._session is not None
        meta: dict[str, Any] = {
            "schema": META_SCHEMA,
            "mode": "attach" if self.attach_pid is not None else "child",
            "target_pid": self._target,
            "rate_hz": self.rate_hz,
            "argv": self._argv,
            "launch_epoch_ns": self._launch_epoch_ns,
            "attempts": self._attempts,
            "trace": RAW_TRACE,
            "alignment": alignment.to_json() if alignment is not None else None,
        }
        if stats is not None:
            meta.update({key: stats.get(key) for key in ("samples", "dropped", "stacks_lost", "stopped_by")})
            meta["errors"] = stats.get("errors", [])
        write_json(self._session.directory / RAW_META, meta)

