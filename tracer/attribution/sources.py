"""Phase sources. Each turns the capture's records into phases for one interval.

Precedence (``rank``, lower wins) is by granularity: eBPF (µs, inside the processes) beats the
Ollama log (1 ms) beats the response fields (exact durations, but merged phases) beats the
client (which sees only its own side). A source that claims a stretch of time removes it from
every coarser source, so nothing is counted twice (see ``tracer.attribution.reconcile``).
Adding a source: one class with ``name``, ``rank`` and ``phases()``, plus one line in
``tracer.attribution.SOURCES``.
"""

from __future__ import annotations

from typing import Any, Protocol

from ollama_tracer.attribution.intervals import Interval
from ollama_tracer.attribution.response import ResponseTimings, response_phases
from ollama_tracer.model import Phase

PROXY_SERVICE = "ollama-proxy"  # tracer.proxy's service name (not imported: the proxy pulls in aiohttp)


class Records(Protocol):
    """The records a capture holds; sources read only what they understand."""

    spans: list[dict[str, Any]]
    extra: dict[str, Any]


class PhaseSource(Protocol):
    name: str
    rank: int

    def phases(self, interval: Interval, records: Records) -> list[Phase]: ...


def _span_phase(span: dict[str, Any], name: str, source: str, process: str) -> Phase:
    return Phase(name=name, start_ns=int(span["startTimeUnixNano"]), end_ns=int(span["endTimeUnixNano"]),
                 source=source, process=process)


class ClientSource:
    name = "client"
    rank = 40

    def phases(self, interval: Interval, records: Records) -> list[Phase]:
        phases = []
        if interval.interrupt is not None:
            phases.append(_span_phase(interval.interrupt, "client.interrupt", self.name, "client"))
        elif interval.cancelled is not None:
            # No client.interrupt span (an uninstrumented interrupt): the client's own time between
            # closing the stream and starting the next request is still the client's.
            gap_start, gap_end = int(interval.cancelled["endTimeUnixNano"]), int(interval.request["startTimeUnixNano"])
            if gap_end > gap_start:
                phases.append(Phase("client.gap", gap_start, gap_end, self.name, "client"))
        # Through `tracer proxy`, the spans are the proxy's: its request and first-token hops are
        # its own added latency, shown as phases of the proxy process.
        via_proxy = interval.request.get("resource", {}).get("service.name") == PROXY_SERVICE
        for child in interval.children:
            if child["name"] in ("client.request", "client.first_token"):
                if via_proxy:
                    name = child["name"].replace("client.", "proxy.")
                    phases.append(_span_phase(child, name, self.name, "proxy"))
                else:
                    phases.append(_span_phase(child, child["name"], self.name, "client"))
        return phases


class ResponseSource:
    name = "response"
    rank = 30

    def phases(self, interval: Interval, records: Records) -> list[Phase]:
        a = interval.request.get("attributes", {})
        needed = ("tracer.request_written_ns", "ollama.created_at_first_ns", "ollama.created_at_last_ns",
                  "ollama.total_duration")
        if any(a.get(key) is None for key in needed):
            return []  # the stream did not reach `done`: no timing fields to rebuild from
        timings = ResponseTimings(
            request_written_ns=int(a["tracer.request_written_ns"]),
            response_start_ns=int(a.get("tracer.response_start_ns") or a["tracer.first_token_ns"]),
            first_created_ns=int(a["ollama.created_at_first_ns"]),
            last_created_ns=int(a["ollama.created_at_last_ns"]),
            total_duration_ns=int(a["ollama.total_duration"]),
            load_duration_ns=int(a.get("ollama.load_duration", 0)),
            prompt_eval_duration_ns=int(a.get("ollama.prompt_eval_duration", 0)),
        )
        offset = int(records.extra.get("server_clock_offset_ns", 0))
        return response_phases(timings, server_offset_ns=offset)
