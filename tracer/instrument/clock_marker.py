"""The clock marker: a thread in the traced Python process that lets py-spy's clock be aligned.

py-spy's timestamps have no epoch anchor. This thread sits, asleep, in :func:`clock_marker`
between two logged ``time_ns()`` readings; the py-spy collector (``collectors.pyspy_clock``)
finds that frame in the samples by its function name, :data:`MARKER_FUNCTION`, and bounds
py-spy's offset to epoch time by the logged readings.

Auto-instrumentation starts it in the traced child (:func:`start_clock_marker`) when the capture
asks for it (``TRACER_PYSPY_MARKER=1``). The markers are dense at first, so that a program of a
second or two still leaves several, then 1 Hz. Each costs a thread wake-up and one write():
nothing measurable.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator

log = logging.getLogger("tracer.autoinstrument")

ENV_MARKER_FILE = "TRACER_MARKER_FILE"  # the capture's clock marker for py-spy alignment
ENV_PYSPY_MARKER = "TRACER_PYSPY_MARKER"  # "1": py-spy samples this process; run the clock-marker thread

MARKER_HOLD_S = 0.025  # long enough that py-spy at 100 Hz sees the frame most times (1 - e^-2.5 = 92%)
MARKER_FIRST_S = 0.1
MARKER_DENSE_GAP_S = 0.2
MARKER_DENSE_COUNT = 10
MARKER_GAP_S = 1.0


def start_clock_marker() -> None:
    """Start the marker thread, appending to the file named by ``TRACER_MARKER_FILE`` (if set)."""
    path = os.environ.get(ENV_MARKER_FILE)
    if not path:
        return
    try:
        # A daemon thread never keeps the program alive, and dies with it.
        threading.Thread(target=_tracer_clock_marker_loop, args=(path,), name="tracer-clock-marker",
                         daemon=True).start()
    except Exception:
        log.debug("clock marker thread did not start", exc_info=True)


def _marker_delays() -> Iterator[float]:
    yield MARKER_FIRST_S
    for _ in range(MARKER_DENSE_COUNT - 1):
        yield MARKER_DENSE_GAP_S
    while True:
        yield MARKER_GAP_S


# The two functions below keep their distinctive names: py-spy shows a frame by its function's
# name, and the collector matches on these (MARKER_FUNCTION, MARKER_FRAMES), old captures included.


def _tracer_clock_marker() -> tuple[int, int]:
    """Sit on the stack, asleep, between two ``time_ns()`` readings: py-spy's samples see this frame.

    py-spy's timestamps have no epoch anchor; the first sample that shows this frame (and the first
    that no longer does) bound py-spy's clock offset against the logged readings. The frame lives a
    few µs longer than [start, end], never shorter, which is what the bounds need; so the caller,
    not this function, writes the line.
    """
    started = time.time_ns()
    time.sleep(MARKER_HOLD_S)
    return started, time.time_ns()


def _tracer_clock_marker_loop(path: str) -> None:
    """Append ``M pid tid start_ns end_ns`` per marker until the process ends or the file goes away.

    Nothing here may reach the host program: every failure ends the thread quietly. No import
    happens in this thread (the import lock is the host's), and the file is not re-created once
    the capture is over (no O_CREAT).
    """
    try:
        pid, tid = os.getpid(), threading.get_ident()  # get_ident() is the pthread id py-spy reports
        for delay in _marker_delays():
            time.sleep(delay)
            started, ended = _tracer_clock_marker()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, f"M {pid} {tid} {started} {ended}\n".encode())  # one write: atomic append
            finally:
                os.close(fd)
    except Exception:
        return


clock_marker = _tracer_clock_marker
clock_marker_loop = _tracer_clock_marker_loop

MARKER_FUNCTION = _tracer_clock_marker.__name__  # the frame py-spy sees while a marker is held
MARKER_LOOP_FUNCTION = _tracer_clock_marker_loop.__name__
MARKER_FRAMES = frozenset({MARKER_FUNCTION, MARKER_LOOP_FUNCTION})  # the marker thread's own frames
