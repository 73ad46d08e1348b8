"""py-spy's chrometrace reader, the clock-marker alignment, and the marker thread."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ollama_tracer import autoinstrument, system
from ollama_tracer.collectors import pyspy
from ollama_tracer.collectors.pyspy import (
    PTRACE_FIX,
    RAW_MARKERS,
    RAW_META,
    RAW_TRACE,
    PySpyCollector,
    diagnose,
    load_stacks,
)
from ollama_tracer.collectors.pyspy_clock import LAUNCH_ERROR_NS, Alignment, align
from ollama_tracer.collectors.pyspy_trace import (
    ChromeEvent,
    ChromeTraceError,
    ClockMarker,
    StackSlice,
    build_slices,
    parse_chrometrace,
    parse_markers,
)
from ollama_tracer.instrument import clock_marker
from ollama_tracer.instrument.clock_marker import MARKER_FUNCTION, MARKER_LOOP_FUNCTION

from tests.conftest import REPO

FILE = "/app/main.py"


def ev(ph: str, name: str, ts_us: int | float, *, pid: int = 1, tid: int = 7, filename: str = FILE) -> dict[str, Any]:
    """An event exactly as py-spy 0.4 writes it."""
    return {"args": {"filename": filename, "line": None}, "cat": "py-spy", "name": name, "ph": ph,
            "pid": pid, "tid": tid, "ts": ts_us}


def frames(*names: str) -> tuple[str, ...]:
    return tuple(f"{name} ({FILE})" for name in names)


def slices_of(events: list[dict[str, Any]], offset_ns: int = 0) -> pyspy.SliceBuild:
    parsed, malformed = parse_chrometrace(json.dumps(events))
    assert malformed == 0
    return build_slices(parsed, offset_ns)


# --- parse_chrometrace --------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe\x00garbage", "null", "42", '"text"', '{"traceEvents": []}',
                                  "[" * 100_000 + "]" * 100_000, "NaN"])
def test_anything_but_a_json_array_is_a_chrome_trace_error(data: bytes | str) -> None:
    with pytest.raises(ChromeTraceError) as err:
        parse_chrometrace(data)
    message = str(err.value)
    assert message.endswith(".") and "\n" not in message


def test_malformed_and_unknown_events_are_counted_not_fatal() -> None:
    good = ev("B", "main", 10)
    data = [
        good,
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 0, "ts": 0, "args": {"name": "1: MainThread"}},
        ev("X", "complete", 5),  # a phase py-spy does not write
        {**good, "pid": True},  # bool is not a pid
        {**good, "tid": "7"},
        {**good, "ts": -1},
        {**good, "ts": float("inf")},
        {**good, "ts": None},
        {**good, "name": 3},
        {**good, "args": {"filename": 5}},
        "not an event",
        17,
        [good],
    ]
    events, malformed = parse_chrometrace(json.dumps(data))
    assert events == [ChromeEvent("B", "main", FILE, 1, 7, 10_000)]
    assert malformed == 11  # the metadata event is known, just not used


def test_float_timestamps_become_integer_ns() -> None:
    events, _ = parse_chrometrace(json.dumps([ev("B", "main", 1.5), ev("E", "main", 2.0004)]))
    assert [e.ts_ns for e in events] == [1500, 2000]
    assert all(isinstance(e.ts_ns, int) for e in events)


# --- build_slices -------------------------------------------------------------------------


def test_nesting_gives_one_slice_per_stack_stretch() -> None:
    build = slices_of([ev("B", "main", 0), ev("B", "load", 10), ev("E", "load", 20), ev("B", "infer", 20),
                       ev("E", "infer", 30), ev("E", "main", 40)], offset_ns=1_000_000_000)
    assert build.slices == [
        StackSlice(1_000_000_000, 1_000_010_000, 1, 7, frames("main")),
        StackSlice(1_000_010_000, 1_000_020_000, 1, 7, frames("main", "load")),
        StackSlice(1_000_020_000, 1_000_030_000, 1, 7, frames("main", "infer")),
        StackSlice(1_000_030_000, 1_000_040_000, 1, 7, frames("main")),
    ]
    assert (build.unbalanced, build.unterminated, build.implicitly_closed) == (0, 0, 0)


def test_an_unchanged_stack_is_one_slice() -> None:
    # An E and a B of the same frame at one timestamp (zero-length gap) do not split the slice.
    build = slices_of([ev("B", "main", 0), ev("E", "main", 10), ev("B", "main", 10), ev("E", "main", 20)])
    assert build.slices == [StackSlice(0, 20_000, 1, 7, frames("main"))]


def test_idle_stacks_are_slices_like_any_other() -> None:
    # With --idle, a sleeping thread shows its sleep frame; durations × rate give the sample count.
    events = [ev("B", "<module>", 0), ev("B", "sleep", 0, filename=""), ev("E", "sleep", 300_000, filename=""),
              ev("B", "busy", 300_000), ev("E", "busy", 900_000), ev("E", "<module>", 1_200_000)]
    build = slices_of(events)
    assert [(s.frames[-1], (s.end_ns - s.start_ns) // 1_000_000) for s in build.slices] == [
        ("sleep", 300), (f"busy ({FILE})", 600), (f"<module> ({FILE})", 300)]
    rate_hz = 100
    assert sum((s.end_ns - s.start_ns) * rate_hz for s in build.slices) // 1_000_000_000 == 120


def test_unbalanced_end_events_are_counted_and_skipped() -> None:
    build = slices_of([ev("E", "ghost", 0), ev("B", "main", 0), ev("B", "inner", 5), ev("E", "main", 10),
                       ev("E", "inner", 12), ev("B", "next", 15), ev("E", "next", 20)])
    # "main" ended while "inner" was open: inner closes with it; the later E of inner has no B left.
    assert build.slices == [StackSlice(0, 5_000, 1, 7, frames("main")),
                            StackSlice(5_000, 10_000, 1, 7, frames("main", "inner")),
                            StackSlice(15_000, 20_000, 1, 7, frames("next"))]
    assert build.unbalanced == 2 and build.implicitly_closed == 1


def test_unterminated_frames_close_at_the_last_timestamp() -> None:
    build = slices_of([ev("B", "main", 0), ev("B", "stuck", 5),
                       ev("B", "other", 0, tid=8), ev("E", "other", 50, tid=8)])
    assert StackSlice(5_000, 50_000, 1, 7, frames("main", "stuck")) in build.slices
    assert build.unterminated == 2


def test_threads_and_processes_are_separate_and_out_of_order_events_are_sorted() -> None:
    build = slices_of([ev("E", "a", 10, tid=1), ev("B", "a", 0, tid=1), ev("B", "b", 0, tid=2, pid=2),
                       ev("E", "b", 20, tid=2, pid=2)])
    assert build.slices == [StackSlice(0, 10_000, 1, 1, frames("a")), StackSlice(0, 20_000, 2, 2, frames("b"))]


def test_the_subprocess_pseudo_frame_is_stripped_and_kept_as_the_command_line() -> None:
    process = 'process 42:"python3 app.py --flag"'
    build = slices_of([ev("B", process, 0, pid=42, filename=""), ev("B", "main", 0, pid=42),
                       ev("E", "main", 10, pid=42), ev("E", process, 10, pid=42, filename="")])
    assert build.slices == [StackSlice(0, 10_000, 42, 7, frames("main"))]
    assert build.processes == {42: "python3 app.py --flag"}


def test_the_clock_marker_thread_is_left_out() -> None:
    marker_thread = [ev("B", "_bootstrap", 0, tid=9, filename="threading.py"),
                     ev("B", MARKER_LOOP_FUNCTION, 0, tid=9), ev("B", "sleep", 0, tid=9, filename=""),
                     ev("E", "sleep", 100, tid=9, filename=""), ev("B", MARKER_FUNCTION, 100, tid=9),
                     ev("E", MARKER_FUNCTION, 130, tid=9), ev("E", MARKER_LOOP_FUNCTION, 200, tid=9),
                     ev("E", "_bootstrap", 200, tid=9, filename="threading.py")]
    build = slices_of([ev("B", "main", 0), ev("E", "main", 200), *marker_thread])
    assert build.slices == [StackSlice(0, 200_000, 1, 7, frames("main"))]
    assert build.marker_slices == 3
    assert MARKER_FUNCTION == "_tracer_clock_marker"


# --- markers and alignment ----------------------------------------------------------------


def test_marker_lines_are_parsed_and_other_lines_left_alone() -> None:
    text = textwrap.dedent("""\
        4242 1700000000000000000 123456789
        M 4242 140000 1700000000100000000 1700000000125000000
        M 4242 140000 1700000000300000000
        M 4242 x 1700000000300000000 1700000000325000000
        M 4242 140000 1700000000500000000 1700000000400000000
        MM 1 2 3 4
        M 4242 140000 1700000000700000000 1700000000725000000
        M 4242 1400""")
    markers, bad = parse_markers(text)
    assert markers == [ClockMarker(4242, 140000, 1700000000100000000, 1700000000125000000),
                       ClockMarker(4242, 140000, 1700000000700000000, 1700000000725000000)]
    assert bad == 5


def simulate(offset_ns: int, n_markers: int, rng: random.Random, *, rate_hz: int = 100,
             latency_ns: int = 50_000) -> tuple[list[ChromeEvent], list[ClockMarker]]:
    """A py-spy run over a marker thread: Poisson sampling (exponential gaps, as py-spy's timer).

    ``ts = (sample time + recording latency - offset)`` truncated to µs, as py-spy writes it.
    """
    period_ns = 1_000_000_000 / rate_hz
    markers: list[ClockMarker] = []
    start = offset_ns + 100_000_000
    for _ in range(n_markers):
        hold = 25_000_000 + int(rng.uniform(0, 5_000_000))  # the sleep, plus waiting for the GIL
        markers.append(ClockMarker(pid=10, tid=77, start_ns=start, end_ns=start + hold))
        start += hold + 200_000_000 + int(rng.uniform(0, 2_000_000))
    samples: list[float] = []
    t = 0.0
    while t < start - offset_ns + 50_000_000:
        t += rng.expovariate(1 / period_ns)
        samples.append(t)
    events: list[ChromeEvent] = []
    for marker in markers:
        begin, end = marker.start_ns - offset_ns, marker.end_ns - offset_ns
        inside = [s for s in samples if begin <= s <= end]
        if not inside:
            continue  # py-spy missed this one
        after = next(s for s in samples if s > end)
        for phase, at in (("B", inside[0]), ("E", after)):
            ts_ns = int(at + latency_ns) // 1000 * 1000
            events.append(ChromeEvent(phase, MARKER_FUNCTION, FILE, 10, 77, ts_ns))
    # The main thread's last event comes later, so no marker E is mistaken for py-spy's final flush.
    events.append(ChromeEvent("B", "main", FILE, 10, 1, int(samples[-1])))
    return events, markers


def test_alignment_recovers_a_known_offset_within_its_error() -> None:
    rng = random.Random(1234)
    offset = 1_700_000_000_123_456_789
    launch = offset - 4_000_000  # py-spy's recorder starts a few ms after we launch it
    inside, errors = 0, []
    runs = 200
    for _ in range(runs):
        events, markers = simulate(offset, 8, rng)
        result = align(events, markers, rate_hz=100, launch_epoch_ns=launch)
        assert result.method == "marker" and result.edges_rejected == 0
        inside += abs(result.offset_ns - offset) <= result.error_ns
        errors.append(result.error_ns)
        assert result.launch_minus_marker_ns == launch - result.offset_ns
        assert min(result.residuals_ns) >= -result.error_ns  # nothing is seen before it happens
    # The error is the half-width of a 99 % interval: allow a few misses in 200 runs.
    assert inside >= runs * 0.96
    assert statistics.median(errors) < 5_000_000


def test_the_error_shrinks_with_more_markers() -> None:
    rng = random.Random(99)
    offset = 1_700_000_000_000_000_000
    medians = []
    for n_markers in (2, 8, 40):
        errors = [align(*simulate(offset, n_markers, rng), rate_hz=100, launch_epoch_ns=offset).error_ns
                  for _ in range(40)]
        medians.append(statistics.median(errors))
    assert medians[0] > 2 * medians[1] > 4 * medians[2]
    assert medians[2] < 1_000_000


def test_a_stray_sighting_is_outvoted() -> None:
    rng = random.Random(5)
    offset = 1_700_000_000_000_000_000
    events, markers = simulate(offset, 10, rng)
    clean = align(events, markers, rate_hz=100, launch_epoch_ns=offset)
    # A marker frame seen 20 ms before its logged start cannot be; the other edges outvote it.
    first = next(e for e in events if e.phase == "B")
    stray = ChromeEvent("B", MARKER_FUNCTION, FILE, 10, 77, first.ts_ns - 20_000_000)
    stray_end = ChromeEvent("E", MARKER_FUNCTION, FILE, 10, 77, first.ts_ns - 19_000_000)
    result = align([stray, stray_end, *events[1:]], markers, rate_hz=100, launch_epoch_ns=offset)
    assert result.edges_rejected >= 1
    assert abs(result.offset_ns - offset) <= max(result.error_ns, clean.error_ns)


def test_markers_pair_even_when_py_spy_renumbers_threads() -> None:
    rng = random.Random(11)
    offset = 1_700_000_000_000_000_000
    events, markers = simulate(offset, 6, rng)
    renumbered = [ChromeEvent(e.phase, e.name, e.filename, e.pid, 0, e.ts_ns) for e in events]
    result = align(renumbered, markers, rate_hz=100, launch_epoch_ns=offset + 3_000_000)
    assert result.method == "marker" and abs(result.offset_ns - offset) <= result.error_ns


def test_without_markers_the_launch_time_is_the_anchor() -> None:
    events, _ = parse_chrometrace(json.dumps([ev("B", "main", 0), ev("E", "main", 10)]))
    result = align(events, [], rate_hz=100, launch_epoch_ns=1_000)
    assert result == Alignment(method="launch", offset_ns=1_000, error_ns=LAUNCH_ERROR_NS)
    # Markers of another process do not count.
    other = [ClockMarker(pid=999, tid=1, start_ns=1_000, end_ns=2_000)]
    assert align(events, other, rate_hz=100, launch_epoch_ns=1_000).method == "launch"


def test_alignment_json_round_trip_and_bad_payloads() -> None:
    alignment = Alignment("marker", 10, 2, 3, 6, 1, (5, 6), -4)
    assert Alignment.from_json(json.loads(json.dumps(alignment.to_json()))) == alignment
    bad_payloads: list[Any] = [None, [], {"method": "guess", "offset_ns": 1, "error_ns": 1},
                               {"method": "marker", "offset_ns": 1.5, "error_ns": 1},
                               {"method": "launch", "offset_ns": True}]
    for bad in bad_payloads:
        assert Alignment.from_json(bad) is None


# --- load_stacks --------------------------------------------------------------------------


def write_capture(directory: Path, trace: str | bytes | None, meta: Any, markers: str = "") -> Path:
    (directory / "raw").mkdir(parents=True, exist_ok=True)
    if trace is not None:
        (directory / RAW_TRACE).write_bytes(trace.encode() if isinstance(trace, str) else trace)
    if meta is not None:
        (directory / RAW_META).write_text(meta if isinstance(meta, str) else json.dumps(meta))
    (directory / RAW_MARKERS).write_text(markers)
    return directory


def test_load_stacks_uses_the_stored_alignment(tmp_path: Path) -> None:
    trace = json.dumps([ev("B", "main", 0), ev("E", "main", 10), {"ph": "??"}])
    meta = {"launch_epoch_ns": 5, "rate_hz": 100,
            "alignment": Alignment("marker", 1_000_000_000, 300_000, 4).to_json()}
    slices, loaded, unusable = load_stacks(write_capture(tmp_path, trace, meta))
    assert slices == [StackSlice(1_000_000_000, 1_000_010_000, 1, 7, frames("main"))]
    assert loaded["alignment"]["method"] == "marker" and unusable == 1 and "error" not in loaded


def test_load_stacks_recomputes_the_alignment_of_a_killed_capture(tmp_path: Path) -> None:
    offset = 1_700_000_000_000_000_000
    events, markers = simulate(offset, 6, random.Random(3))
    trace = json.dumps([ev(e.phase, e.name, e.ts_ns // 1000, pid=e.pid, tid=e.tid) for e in events])
    lines = "".join(f"M {m.pid} {m.tid} {m.start_ns} {m.end_ns}\n" for m in markers)
    _, loaded, _ = load_stacks(write_capture(tmp_path, trace, {"launch_epoch_ns": offset, "rate_hz": 100,
                                                               "alignment": None}, lines))
    assert loaded["alignment"]["method"] == "marker"
    assert abs(loaded["alignment"]["offset_ns"] - offset) <= loaded["alignment"]["error_ns"]


@pytest.mark.parametrize(("trace", "meta", "error"), [
    (None, None, None),  # no py-spy in this capture
    ("", {"launch_epoch_ns": 1}, "py-spy wrote no stacks"),  # pre-created, never written
    ('[{"ph": "B"', {"launch_epoch_ns": 1}, "not valid JSON"),
    ("{}", {"launch_epoch_ns": 1}, "not an array"),
    (json.dumps([ev("B", "main", 0)]), "{corrupt", "no launch time"),
    (json.dumps([ev("B", "main", 0)]), {"launch_epoch_ns": "soon"}, "no launch time"),
])
def test_load_stacks_never_raises_on_a_bad_capture(tmp_path: Path, trace: str | None, meta: Any,
                                                   error: str | None) -> None:
    slices, loaded, _ = load_stacks(write_capture(tmp_path, trace, meta))
    assert slices == []
    if error is None:
        assert loaded == {}
    else:
        assert error in loaded["error"]


# --- fuzzing ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=5),
    max_leaves=30,
)
event_like = st.fixed_dictionaries(
    {"ph": st.sampled_from(["B", "E", "M", "X", "b", ""]) | json_values,
     "name": st.sampled_from(["main", MARKER_FUNCTION, MARKER_LOOP_FUNCTION, 'process 1:"x"']) | json_values,
     "pid": st.integers(-2, 3) | json_values, "tid": st.integers(-2, 3) | json_values,
     "ts": st.integers(-5, 10**7) | st.floats() | json_values},
    optional={"args": st.fixed_dictionaries({"filename": st.sampled_from(["", FILE]) | json_values})
              | json_values},
)


def _exercise(data: bytes | str) -> None:
    try:
        events, malformed = parse_chrometrace(data)
    except ChromeTraceError as err:
        assert str(err).endswith(".")
        return
    assert malformed >= 0
    build = build_slices(events, 1_700_000_000_000_000_000)
    assert all(s.end_ns > s.start_ns and s.frames for s in build.slices)
    markers = [ClockMarker(1, 1, 1_700_000_000_000_000_000 + i, 1_700_000_000_025_000_000 + i) for i in range(3)]
    result = align(events, markers, rate_hz=100, launch_epoch_ns=1_700_000_000_000_000_000)
    assert result.error_ns >= 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_fuzz_arbitrary_bytes_and_text(data: bytes | str) -> None:
    _exercise(data)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzz_arbitrary_json(value: Any) -> None:
    _exercise(json.dumps(value))


@settings(max_examples=300, deadline=None)
@given(st.lists(event_like | json_values, max_size=40))
def test_fuzz_event_like_arrays(value: list[Any]) -> None:
    _exercise(json.dumps(value))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300), st.lists(event_like, max_size=20), json_values)
def test_fuzz_load_stacks_and_markers(markers: str, trace: list[Any], meta: Any) -> None:
    parse_markers(markers)
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_capture(Path(tmp), json.dumps(trace), json.dumps(meta), markers)
        slices, loaded, unusable = load_stacks(directory)
        assert all(s.end_ns > s.start_ns for s in slices)
        assert isinstance(loaded, dict) and unusable >= 0


# --- collector pieces ---------------------------------------------------------------------


def test_diagnose_gives_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    assert PTRACE_FIX in diagnose("Error: Permission Denied: Try running again with elevated permissions", 12)
    assert PTRACE_FIX in diagnose("Error: Operation not permitted (os error 1)", 12)
    no_python = "Error: No python processes found in process 12 or any of its subprocesses"
    monkeypatch.setattr(system, "has_capability", lambda bit: False)
    assert PTRACE_FIX in diagnose(no_python, 12)
    monkeypatch.setattr(system, "has_capability", lambda bit: True)
    assert "ran no Python" in diagnose(no_python, 12)
    assert "Error: something odd" in diagnose("py-spy> hello\nError: something odd\n\nStack backtrace:\n  0: x", 12)


def test_available_says_why_and_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from ollama_tracer.doctor_checks import CheckResult

    collector = PySpyCollector()
    monkeypatch.setattr(pyspy, "pyspy_binary", lambda: None)
    assert collector.available() == (False, "py-spy is not installed; `pip install py-spy`")
    monkeypatch.setattr(pyspy, "pyspy_binary", lambda: "/usr/bin/py-spy")
    monkeypatch.setattr(pyspy, "check_pyspy", lambda: CheckResult(
        "py-spy", "unavailable", "py-spy 0.4.3; kernel.yama.ptrace_scope=3 forbids sampling", "x"))
    ok, reason = collector.available()
    assert not ok and PTRACE_FIX in reason and "ptrace_scope=3" in reason
    monkeypatch.setattr(pyspy, "check_pyspy", lambda: CheckResult("py-spy", "ok", "py-spy 0.4.3"))
    monkeypatch.setattr(system, "has_capability", lambda bit: False)
    monkeypatch.setattr(system, "ptrace_scope", lambda: 1)
    ok, reason = collector.available()
    assert not ok and "kernel.yama.ptrace_scope=0" in reason
    monkeypatch.setattr(system, "ptrace_scope", lambda: 0)
    assert collector.available() == (True, "")


def test_stop_without_a_command_reports_instead_of_failing(tmp_path: Path) -> None:
    from ollama_tracer.clock import ClockModel
    from ollama_tracer.collectors.base import SessionInfo

    collector = PySpyCollector()
    session = SessionInfo(directory=tmp_path, clock=ClockModel.measure())
    if pyspy.pyspy_binary() is None:
        pytest.skip("py-spy is not installed")
    collector.start(session)
    assert session.child_env == {autoinstrument.ENV_PYSPY_MARKER: "1"}
    stats = collector.stop()
    assert stats["attempts"] == 0 and "did not run" in stats["errors"][0]


# A py-spy that seizes the command (PTRACE_SEIZE + PTRACE_INTERRUPT, as py-spy does for each
# sample) and never lets go: the stall the eviction capture once hung in.
STUCK_PYSPY = """#!{python}
import ctypes, os, sys, time
pid = int(sys.argv[sys.argv.index("--pid") + 1])
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
if libc.ptrace(0x4206, pid, None, None) != 0 or libc.ptrace(0x4207, pid, None, None) != 0:
    sys.exit("ptrace: " + os.strerror(ctypes.get_errno()))
os.waitpid(pid, 0x40000000)  # __WALL: the interrupt's stop
print("holding", pid, flush=True)
time.sleep(3600)
"""


@pytest.mark.skipif(not system.has_capability(system.CAP_SYS_PTRACE), reason="needs CAP_SYS_PTRACE (root)")
def test_a_py_spy_that_holds_the_command_stopped_is_killed_and_the_command_carries_on(tmp_path: Path) -> None:
    from ollama_tracer.clock import ClockModel
    from ollama_tracer.collectors.base import SessionInfo

    fake = tmp_path / "py-spy"
    fake.write_text(STUCK_PYSPY.format(python=sys.executable))
    fake.chmod(0o755)
    work = "import time\nfor _ in range(20): time.sleep(0.05)\nprint('done')"
    command = subprocess.Popen([sys.executable, "-c", work], stdout=subprocess.PIPE)
    collector = PySpyCollector(attach_pid=command.pid)
    collector._binary = str(fake)
    (tmp_path / "capture" / "raw").mkdir(parents=True)
    collector.start(SessionInfo(directory=tmp_path / "capture", clock=ClockModel.measure()))
    # 1 s of work; held by the fake until the guard kills it, then finished.
    out, _ = command.communicate(timeout=60)
    stats = collector.stop()
    assert out.strip() == b"done" and command.returncode == 0
    assert "holding" in (tmp_path / "capture" / pyspy.RAW_STDERR).read_text()  # it did hold the command
    assert stats["stopped_by"] == "stall" and stats["stacks_lost"], stats
    assert any("held the command stopped for 5 s and was killed" in e for e in stats["errors"]), stats["errors"]


# --- the marker thread --------------------------------------------------------------------


def test_marker_thread_writes_lines_and_ends_quietly_when_the_file_goes(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock_marker, "MARKER_FIRST_S", 0.0)
    monkeypatch.setattr(clock_marker, "MARKER_DENSE_GAP_S", 0.01)
    monkeypatch.setattr(clock_marker, "MARKER_HOLD_S", 0.002)
    path = tmp_path / "markers.txt"
    path.write_text("")
    monkeypatch.setenv(autoinstrument.ENV_MARKER_FILE, str(path))
    before = set(threading.enumerate())
    clock_marker.start_clock_marker()
    (thread,) = set(threading.enumerate()) - before
    assert thread.daemon and thread.name == "tracer-clock-marker"
    deadline = time.monotonic() + 5
    while len(path.read_text().splitlines()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    markers, bad = parse_markers(path.read_text())
    assert len(markers) >= 3 and bad == 0
    assert all(m.pid == os.getpid() and m.tid == thread.ident and m.end_ns - m.start_ns >= 2_000_000
               for m in markers)
    path.unlink()  # the capture is over: the thread stops rather than re-create the file
    thread.join(timeout=5)
    assert not thread.is_alive() and not path.exists()


def test_auto_instrumented_child_runs_markers_and_still_exits_promptly(tmp_path: Path) -> None:
    path = tmp_path / "markers.txt"
    path.write_text("")
    env = autoinstrument.child_env(dict(os.environ), endpoint=None, marker_file=str(path))
    env[autoinstrument.ENV_PYSPY_MARKER] = "1"
    program = "import time; time.sleep(0.6); print('done')"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60,
                          cwd=REPO, check=False)
    assert proc.returncode == 0 and proc.stdout == "done\n" and "tracer" not in proc.stderr
    assert time.monotonic() - started < 30  # the daemon thread does not keep it alive past its end
    markers, bad = parse_markers(path.read_text())
    assert bad == 0 and len(markers) >= 2 and {m.pid for m in markers} == {markers[0].pid}
    assert all(math.isclose(m.end_ns - m.start_ns, 25_000_000, rel_tol=0.8) for m in markers)
    # The start-up line keeps its format: pid time_ns monotonic_ns.
    plain = [line.split() for line in path.read_text().splitlines() if not line.startswith("M")]
    assert len(plain) == 1 and len(plain[0]) == 3 and int(plain[0][0]) == markers[0].pid


def test_no_marker_thread_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "markers.txt"
    path.write_text("")
    env = autoinstrument.child_env(dict(os.environ), endpoint=None, marker_file=str(path))
    env.pop(autoinstrument.ENV_PYSPY_MARKER, None)
    subprocess.run([sys.executable, "-c", "import time; time.sleep(0.4)"], env=env, timeout=60, cwd=REPO,
                   check=True)
    assert parse_markers(path.read_text()) == ([], 0)
