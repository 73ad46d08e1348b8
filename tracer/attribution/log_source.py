"""Phases from Ollama's debug log, where eBPF is missing (1 ms resolution, merged phases).

Handler start is not logged; it comes from the response (``created_at − total_duration``).
The log then marks: ``evaluating already loaded`` (after the GGUF scans, in the scheduler),
``loading cache slot`` (the runner admitted the sequence), and on a load ``starting runner``
… ``llama runner started``. The first chunk at the server is the first ``created_at``.
"""

from __future__ import annotations

from ollama_tracer.attribution.intervals import Interval
from ollama_tracer.attribution.sources import Records
from ollama_tracer.model import Phase

SOURCE = "log"


class LogSource:
    name = SOURCE
    rank = 20

    def phases(self, interval: Interval, records: Records) -> list[Phase]:
        events = records.extra.get("log_events")
        a = interval.request.get("attributes", {})
        if not events or a.get("ollama.total_duration") is None:
            return []
        offset = int(records.extra.get("server_clock_offset_ns", 0))
        handler = int(a["ollama.created_at_last_ns"]) - int(a["ollama.total_duration"]) - offset
        first_chunk = int(a["ollama.created_at_first_ns"]) - offset
        window = [e for e in events if handler - 1_000_000 <= e.time_ns <= first_chunk + 1_000_000]

        def first(msg: str, after: int) -> int | None:
            return next((e.time_ns for e in window if e.msg.startswith(msg) and e.time_ns >= after), None)

        phases: list[Phase] = []
        attrs = {"resolution_ms": 1}
        load_start = first("starting runner", handler)
        if load_start is not None:
            load_end = first("llama runner started", load_start) or first("loading cache slot", load_start)
            if load_end is not None:
                reason = "reload" if first("evaluating already loaded", handler) is not None else "cold load"
                phases.append(Phase("server.model_load", load_start, load_end, SOURCE, "server",
                                    {**attrs, "reason": reason}))
        evaluated = first("evaluating already loaded", handler)
        admitted = first("loading cache slot", evaluated or handler)
        if evaluated is not None:
            phases.append(Phase("server.decode+model_lookup", handler, evaluated, SOURCE, "server", attrs))
        if evaluated is not None and admitted is not None:
            phases.append(Phase("server.schedule+handoff+runner.admit", evaluated, admitted, SOURCE, "server", attrs))
        if admitted is not None and admitted <= first_chunk:
            phases.append(Phase("runner.prefill+sample", admitted, first_chunk, SOURCE, "runner", attrs))
        return phases
