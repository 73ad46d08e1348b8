"""py-spy on a real Python target: are the aligned stacks where the target says its work was?

Needs py-spy and permission to trace (root, CAP_SYS_PTRACE, or the same uid under a permissive
ptrace_scope); no Ollama.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ollama_tracer.autoinstrument import child_env
from ollama_tracer.clock import ClockModel
from ollama_tracer.collectors.base import SessionInfo
from ollama_tracer.collectors.pyspy import RAW_META, RAW_STDERR, RAW_TRACE, PySpyCollector, load_stacks
from ollama_tracer.collectors.pyspy_trace import StackSlice

from tests.conftest import REPO, run_tracer

pytestmark = pytest.mark.integration

TARGET = str(Path(REPO) / "tests" / "targets" / "busy_target.py")
BUSY = "busy_spin_for_test"
RATE_HZ = 100
PERIOD_NS = 1_000_000_000 // RATE_HZ
# A slice ends at the first sample that no longer shows its frame: when py-spy notices the end,
# which is an exponential lag at rest (over 5 periods once in 150 runs) and unbounded on a loaded
# machine (CI saw 7.6 periods), so the end of the last slice is no bound on the alignment. What
# is: no sample shows the frame before the function began or after it ended (a slice starts at a
# sample that shows it), up to the alignment's error and one period for when py-spy stamps it.


@pytest.fixture(scope="module")
def pyspy_ok() -> None:
    ok, reason = PySpyCollector().available()
    if not ok:
        pytest.skip(reason)


def _busy(slices: list[StackSlice]) -> list[StackSlice]:
    return [s for s in slices if any(frame.startswith(f"{BUSY} (") for frame in s.frames)]


def _check_busy_window(slices: list[StackSlice], bounds: dict[str, int], alignment: dict[str, Any]) -> None:
    busy = _busy(slices)
    assert busy, "py-spy never saw the busy function"
    start, end = bounds["busy_start_ns"], bounds["busy_end_ns"]
    error = alignment["error_ns"]
    first, last = min(s.start_ns for s in busy), max(s.end_ns for s in busy)
    last_seen = max(s.start_ns for s in busy)
    assert first >= start - error - PERIOD_NS, (first - start) / 1e6
    assert last_seen <= end + error + PERIOD_NS, (last_seen - end) / 1e6
    assert last >= end - error - PERIOD_NS, (last - end) / 1e6
    assert sum(s.end_ns - s.start_ns for s in busy) >= 0.8 * (end - start)


def test_collector_stacks_line_up_with_the_target_clock(pyspy_ok: None, tmp_path: Path) -> None:
    session = SessionInfo(directory=tmp_path, clock=ClockModel.measure())
    collector = PySpyCollector(RATE_HZ)
    collector.start(session)
    markers = session.raw_dir / "markers.txt"
    os.close(os.open(markers, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))  # as tracer.capture does
    env = child_env({**os.environ, **session.child_env}, endpoint=None, marker_file=str(markers))
    child = subprocess.Popen([sys.executable, TARGET], env=env, stdout=subprocess.PIPE, text=True, cwd=REPO,
                             start_new_session=True)
    collector.child_started(child.pid)
    try:
        out, _ = child.communicate(timeout=60)
    finally:
        stats = collector.stop()
    assert child.returncode == 0
    bounds = json.loads(out)
    assert stats["stacks_lost"] is False and stats["errors"] == [], (tmp_path / RAW_STDERR).read_text()
    assert stats["samples"] > 0 and stats["stopped_by"] == "exit"
    # --nonblocking: a sample read while the busy stack changes is torn, and py-spy drops it
    # (here 10 of 346 once); the slices below must still cover the busy window.
    assert stats["dropped"] <= 0.1 * stats["samples"], stats

    slices, meta, unusable = load_stacks(tmp_path)
    alignment = meta["alignment"]
    print(f"\nalignment: {json.dumps({k: v for k, v in alignment.items() if k != 'residuals_ns'})}")
    assert alignment["method"] == "marker" and alignment["markers_used"] >= 2
    assert 0 < alignment["error_ns"] < 15_000_000
    assert stats["alignment"] == alignment  # what stop() stored is what the reader uses
    assert abs(alignment["launch_minus_marker_ns"]) < 50_000_000
    assert unusable == 0 and meta["marker_slices_excluded"] > 0
    assert not any("_tracer_clock_marker" in frame for s in slices for frame in s.frames)
    _check_busy_window(slices, bounds, alignment)
    for name in (RAW_TRACE, RAW_META, RAW_STDERR):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name


def test_a_non_python_command_is_reported_and_the_capture_goes_on(pyspy_ok: None, tmp_path: Path) -> None:
    session = SessionInfo(directory=tmp_path, clock=ClockModel.measure())
    collector = PySpyCollector(RATE_HZ)
    collector.start(session)
    child = subprocess.Popen(["sleep", "1.5"], start_new_session=True)
    collector.child_started(child.pid)
    child.wait(timeout=30)
    stats = collector.stop()
    assert stats["stacks_lost"] is False  # nothing to lose: no Python ran
    assert stats["attempts"] >= 1 and "no Python process" in stats["errors"][0]
    slices, meta, _ = load_stacks(tmp_path)
    assert slices == [] and meta["error"] == "py-spy wrote no stacks"


def test_attach_mode_stops_py_spy_with_sigint_and_keeps_the_stacks(pyspy_ok: None, tmp_path: Path) -> None:
    target = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.01)"])
    try:
        session = SessionInfo(directory=tmp_path, clock=ClockModel.measure())
        collector = PySpyCollector(RATE_HZ, attach_pid=target.pid)
        collector.start(session)
        assert session.child_env == {}  # the command is not the one sampled: no markers
        subprocess.run(["sleep", "1"], check=True)
        stats = collector.stop()
    finally:
        target.kill()
        target.wait()
    assert stats["stopped_by"] == "sigint" and stats["stacks_lost"] is False and stats["samples"] > 0
    slices, meta, _ = load_stacks(tmp_path)
    assert meta["alignment"]["method"] == "launch" and slices
    assert {s.pid for s in slices} == {target.pid}


def test_tracer_capture_runs_py_spy(pyspy_ok: None, tmp_path: Path) -> None:
    registry = (Path(REPO) / "collectors" / "registry.py").read_text()
    if "PySpyCollector" not in registry:
        pytest.skip("the py-spy collector is not registered yet")
    out = tmp_path / "cap"
    proc = run_tracer("capture", "--no-ebpf", "-o", str(out), "--", sys.executable, TARGET, timeout=180)
    assert proc.returncode == 0, proc.stderr
    bounds = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"busy_start_ns"')))
    capture = json.loads((out / "capture.json").read_text())
    status = capture["collectors"]["pyspy"]
    assert status["ran"] and status["stats"]["errors"] == [], status
    slices, meta, _ = load_stacks(out)
    assert meta["alignment"]["method"] == "marker" and meta["alignment"]["error_ns"] < 15_000_000
    _check_busy_window(slices, bounds, meta["alignment"])
