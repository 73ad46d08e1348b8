"""Phase sources. Each turns the capture's records into phases for one interval.

Precedence (``rank``, lower wins) is by granularity: eBPF (µs, inside the processes) beats the
Ollama log (1 ms) beats the response fields (exact durations, but merged phases) beats the
client (which sees only its own side). A source that claims a stretch of time removes it from
every coarser source, so nothing is counted twice (see ``tracer.attribution.reconcile``).
Adding a source: one class with ``name``, ``rank`` and ``phases()``, plus one line in
``tracer.attribution.SOURCES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ollama_tracer.attribution.intervals import Interval, seen_from_server
from ollama_tracer.attribution.response import ResponseTimings, response_phases
from ollama_tracer.capture.directory import CaptureRecords
from ollama_tracer.collectors.probe_catalogue import design_for
from ollama_tracer.model import Phase
from ollama_tracer.vocabulary import (
    CLIENT_FIRST_TOKEN,
    CLIENT_GAP,
    CLIENT_INTERRUPT,
    CLIENT_REQUEST,
    DESIGN_LLAMA_SERVER,
    OLLAMA_CREATED_AT_FIRST_NS,
    OLLAMA_CREATED_AT_LAST_NS,
    OLLAMA_LOAD_DURATION,
    OLLAMA_PROMPT_EVAL_DURATION,
    OLLAMA_TOTAL_DURATION,
    PROCESS_CLIENT,
    PROCESS_PROXY,
    PROCESS_SERVER,
    PROXY_PHASE_OF,
    SERVER_AWAITING_CLIENT,
    SERVICE_NAME,
    SERVICE_PROXY,
    SOURCE_CLIENT,
    SOURCE_EBPF,
    SOURCE_RESPONSE,
    TRACER_FIRST_TOKEN_NS,
    TRACER_REQUEST_WRITTEN_NS,
    TRACER_RESPONSE_START_NS,
)

PROXY_SERVICE = SERVICE_PROXY  # tracer.proxy's service name (not from there: the proxy pulls in aiohttp)


@dataclass
class Found:
    """What a source found for one interval: its phases, and what it wants said about how it
    matched the interval (merged across intervals into ``attribution["<source>_matching"]``:
    counts add up, lists are joined)."""

    phases: list[Phase]
    outcome: dict[str, Any] = field(default_factory=dict)


class PhaseSource(Protocol):
    name: str
    rank: int

    def find(self, interval: Interval, records: CaptureRecords) -> Found: ...


class Source:
    """A source whose only result is its phases; ``phases()`` is also what tests call."""

    def find(self, interval: Interval, records: CaptureRecords) -> Found:
        return Found(self.phases(interval, records))

    def phases(self, interval: Interval, records: CaptureRecords) -> list[Phase]:
        raise NotImplementedError


def _span_phase(span: dict[str, Any], name: str, source: str, process: str) -> Phase:
    return Phase(name=name, start_ns=int(span["startTimeUnixNano"]), end_ns=int(span["endTimeUnixNano"]),
                 source=source, process=process)


class ClientSource(Source):
    name = SOURCE_CLIENT
    rank = 40

    def phases(self, interval: Interval, records: CaptureRecords) -> list[Phase]:
        phases = []
        closed = interval.interrupt if interval.interrupt is not None else interval.cancelled
        if interval.interrupt is not None:
            phases.append(_span_phase(interval.interrupt, CLIENT_INTERRUPT, self.name, PROCESS_CLIENT))
        if closed is not None:
            # The client's own time between closing the stream and starting the next request (with
            # no client.interrupt span, an uninstrumented interrupt, that is all of it) is the client's.
            gap_start, gap_end = int(closed["endTimeUnixNano"]), int(interval.request["startTimeUnixNano"])
            if gap_end > gap_start and seen_from_server(interval.request):
                # No client span: the times are the server's reads, the client's own time is not known.
                phases.append(Phase(SERVER_AWAITING_CLIENT, gap_start, gap_end, SOURCE_EBPF, PROCESS_SERVER))
            elif gap_end > gap_start:
                phases.append(Phase(CLIENT_GAP, gap_start, gap_end, self.name, PROCESS_CLIENT))
        # Through `tracer proxy`, the spans are the proxy's: its request and first-token hops are
        # its own added latency, shown as phases of the proxy process.
        via_proxy = interval.request.get("resource", {}).get(SERVICE_NAME) == PROXY_SERVICE
        for child in interval.children:
            if child["name"] in (CLIENT_REQUEST, CLIENT_FIRST_TOKEN):
                if via_proxy:
                    name = PROXY_PHASE_OF[child["name"]]
                    phases.append(_span_phase(child, name, self.name, PROCESS_PROXY))
                else:
                    phases.append(_span_phase(child, child["name"], self.name, PROCESS_CLIENT))
        return phases


class ResponseSource(Source):
    name = SOURCE_RESPONSE
    rank = 30

    def phases(self, interval: Interval, records: CaptureRecords) -> list[Phase]:
        a = interval.request.get("attributes", {})
        needed = (TRACER_REQUEST_WRITTEN_NS, OLLAMA_CREATED_AT_FIRST_NS, OLLAMA_CREATED_AT_LAST_NS,
                  OLLAMA_TOTAL_DURATION)
        if any(a.get(key) is None for key in needed):
            return []  # the stream did not reach `done`: no timing fields to rebuild from
        timings = ResponseTimings(
            request_written_ns=int(a[TRACER_REQUEST_WRITTEN_NS]),
            response_start_ns=int(a.get(TRACER_RESPONSE_START_NS) or a[TRACER_FIRST_TOKEN_NS]),
            first_created_ns=int(a[OLLAMA_CREATED_AT_FIRST_NS]),
            last_created_ns=int(a[OLLAMA_CREATED_AT_LAST_NS]),
            total_duration_ns=int(a[OLLAMA_TOTAL_DURATION]),
            load_duration_ns=int(a.get(OLLAMA_LOAD_DURATION, 0)),
            prompt_eval_duration_ns=int(a.get(OLLAMA_PROMPT_EVAL_DURATION, 0)),
        )
        offset = records.server_clock_offset_ns
        return response_phases(timings, server_offset_ns=offset,
                               llama_server=design_for(records.ollama_version) == DESIGN_LLAMA_SERVER)
