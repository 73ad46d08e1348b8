"""Phases from Ollama's debug log, where eBPF is missing (1 ms resolution, merged phases).

Handler start is not logged; it comes from the response (``created_at − total_duration``).
The log then marks: ``evaluating already loaded`` (after the GGUF scans, in the scheduler),
``loading cache slot`` (the runner admitted the sequence), and on a load ``starting runner``
… ``llama runner started``. The first chunk at the server is the first ``created_at``.
"""

from __future__ import annotations

from ollama_tracer.attribution.intervals import Interval
from ollama_tracer.attribution.sources import Source
from ollama_tracer.capture.directory import CaptureRecords
from ollama_tracer.collectors.ollama_log import LogEvent, LogRecords
from ollama_tracer.model import Phase
from ollama_tracer.vocabulary import (
    OLLAMA_CREATED_AT_FIRST_NS,
    OLLAMA_CREATED_AT_LAST_NS,
    OLLAMA_LOG_RUNNER_MODEL,
    OLLAMA_LOG_RUNNER_PID,
    OLLAMA_TOTAL_DURATION,
    PROCESS_RUNNER,
    PROCESS_SERVER,
    RUNNER_ADMIT,
    RUNNER_PREFILL,
    RUNNER_SAMPLE,
    SERVER_DECODE,
    SERVER_HANDOFF,
    SERVER_MODEL_LOAD,
    SERVER_MODEL_LOOKUP,
    SERVER_SCHEDULE,
    SOURCE_LOG,
    merged_name,
)

SOURCE = SOURCE_LOG
# The scheduler's own words (OLLAMA_DEBUG=1) about a runner going away, each with runner.model.
EVICTING = "resetting model to expire immediately to make room"
EXPIRED = "runner expired event received"  # after a keep_alive timer, keep_alive 0, or an eviction


def load_reason(events: list[LogEvent], start: LogEvent, reloaded: bool) -> str:
    """Why the runner that ``start`` (``starting runner``) began was needed, from the server log
    alone: what the log said last about a runner of the same model before it."""
    if reloaded:
        return "reload: the loaded runner did not fit the request (server log: evaluating already loaded)"
    argv = start.attrs.get("cmd", "").split()
    model = argv[argv.index("--model") + 1] if "--model" in argv[:-1] else None
    before = [e for e in events
              if e.time_ns < start.time_ns and model and e.attrs.get(OLLAMA_LOG_RUNNER_MODEL) == model]
    gone = next((e for e in reversed(before) if e.msg == EXPIRED), None)
    if gone is None:
        return "cold load: no runner of this model ran earlier in the server log"
    ago = (start.time_ns - gone.time_ns) / 1e6
    pid = gone.attrs.get(OLLAMA_LOG_RUNNER_PID, "?")
    if any(e.msg == EVICTING and e.time_ns <= gone.time_ns for e in before if gone.time_ns - e.time_ns < 1e9):
        return (f"evicted: this model's runner (pid {pid}) was stopped {ago:g} ms before this load to make room "
                "for another model (server log: max runners, resetting model to expire immediately)")
    return (f"expired: this model's runner (pid {pid}) expired {ago:g} ms before this load (keep_alive; "
            "server log: runner expired event received)")


class LogSource(Source):
    name = SOURCE
    rank = 20

    def phases(self, interval: Interval, records: CaptureRecords) -> list[Phase]:
        log = records.get(LogRecords)
        events = log.events if log else []
        a = interval.request.get("attributes", {})
        if not events or a.get(OLLAMA_TOTAL_DURATION) is None:
            return []
        offset = records.server_clock_offset_ns
        handler = int(a[OLLAMA_CREATED_AT_LAST_NS]) - int(a[OLLAMA_TOTAL_DURATION]) - offset
        first_chunk = int(a[OLLAMA_CREATED_AT_FIRST_NS]) - offset
        assert log is not None
        window = log.between(handler - 1_000_000, first_chunk + 1_000_000)

        def first(msg: str, after: int) -> int | None:
            return next((e.time_ns for e in window if e.msg.startswith(msg) and e.time_ns >= after), None)

        phases: list[Phase] = []
        attrs = {"resolution_ms": 1}
        load_start = first("starting runner", handler)
        if load_start is not None:
            load_end = first("llama runner started", load_start) or first("loading cache slot", load_start)
            if load_end is not None:
                started = next(e for e in window if e.msg.startswith("starting runner") and e.time_ns == load_start)
                reason = load_reason(events, started, first("evaluating already loaded", handler) is not None)
                phases.append(Phase(SERVER_MODEL_LOAD, load_start, load_end, SOURCE, PROCESS_SERVER,
                                    {**attrs, "reason": reason}))
        evaluated = first("evaluating already loaded", handler)
        admitted = first("loading cache slot", evaluated or handler)
        if evaluated is not None:
            phases.append(Phase(merged_name([SERVER_DECODE, SERVER_MODEL_LOOKUP]), handler, evaluated, SOURCE,
                                PROCESS_SERVER, attrs))
        if evaluated is not None and admitted is not None:
            phases.append(Phase(merged_name([SERVER_SCHEDULE, SERVER_HANDOFF, RUNNER_ADMIT]), evaluated, admitted,
                                SOURCE, PROCESS_SERVER, attrs))
        if admitted is not None and admitted <= first_chunk:
            phases.append(Phase(merged_name([RUNNER_PREFILL, RUNNER_SAMPLE]), admitted, first_chunk, SOURCE,
                                PROCESS_RUNNER, attrs))
        return phases
