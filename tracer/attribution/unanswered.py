"""Requests that never got a first token: how far each came, and where it has been waiting since.

A request the client gave up on (a timeout, a reset, the capture ending) is no interval: it has
no first token to end one. It is still the most important request of a capture that has one:
when Ollama stalls (docs/interrupt-stall.md), it shows *which* phase the server is stuck in. For
each, the eBPF boundaries found between the request's start and the client giving up say the
last boundary reached; the phase that starts there is the one it waited in until the end.
"""

from __future__ import annotations

from typing import Any

from ollama_tracer.attribution.ebpf_source import EbpfSource
from ollama_tracer.attribution.intervals import Interval, is_genai
from ollama_tracer.capture.directory import CaptureRecords
from ollama_tracer.vocabulary import (
    GEN_AI_REQUEST_MODEL,
    TRACER_CANCELLED,
    TRACER_FIRST_TOKEN_NS,
)

# Under this, a request that failed without a first token failed fast (an error answer), not stuck.
STUCK_AFTER_NS = 1_000_000_000


def unanswered(records: CaptureRecords) -> list[dict[str, Any]]:
    """One entry per request without a first token that the client did not cancel itself."""
    out = []
    source = EbpfSource()
    for span in sorted(records.spans, key=lambda s: int(s["startTimeUnixNano"])):
        attributes = span.get("attributes", {})
        if (not is_genai(span) or attributes.get(TRACER_CANCELLED)
                or attributes.get(TRACER_FIRST_TOKEN_NS) is not None):
            continue
        start, end = int(span["startTimeUnixNano"]), int(span["endTimeUnixNano"])
        entry: dict[str, Any] = {
            "trace_id": span.get("traceId"), "model": attributes.get(GEN_AI_REQUEST_MODEL), "start_ns": start,
            "end_ns": end, "waited_ms": (end - start) / 1e6,
            "error": (span.get("status") or {}).get("message") or None,
            "stuck_in": None, "since_ns": None, "stuck_ms": None, "last_boundary": None,
        }
        reached = source.last_boundary(Interval(index=-1, kind="unanswered", start_ns=start, end_ns=end,
                                                trace_id=str(span.get("traceId")), request=span), records)
        if reached is not None:
            boundary, event = reached
            entry.update(last_boundary=boundary.key, since_ns=event.time_ns, stuck_ms=(end - event.time_ns) / 1e6,
                         # SW is the server's own response write: it answered, the client did not get it.
                         stuck_in=boundary.starts or "after the server's response")
        out.append(entry)
    return out


def stuck(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries that waited (not failed fast) and whose waiting phase is known."""
    return [e for e in entries if e["stuck_in"] and e["end_ns"] - e["start_ns"] >= STUCK_AFTER_NS]
