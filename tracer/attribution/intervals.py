"""Find the intervals to attribute, from the client spans of a capture.

* **interrupt**: a stream the client closed early (``tracer.cancelled``), followed in the same
  trace or process by a new request within ``INTERRUPT_WINDOW_NS``. The interval runs from the
  interrupt (the ``client.interrupt`` span's start when the client recorded one, otherwise the
  cancelled span's end) to the next request's first token handed to the caller.
* **request**: any other completed request: request built → first token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ollama_tracer.vocabulary import (
    CLIENT_INTERRUPT,
    GEN_AI_PROVIDER_NAME,
    GENAI_PROVIDERS,
    PROCESS_CLIENT,
    PROCESS_PID,
    SERVICE_INSTANCE_ID,
    SERVICE_NAME,
    SOURCE_EBPF,
    THREAD_ID,
    TRACER_CANCELLED,
    TRACER_CLIENT_KEY,
    TRACER_FIRST_TOKEN_NS,
    TRACER_ITERATION_INDEX,
    TRACER_SOURCE,
    TRACER_WARMUP,
    process_prefix,
)

Span = dict[str, Any]

INTERRUPT_WINDOW_NS = 5_000_000_000


@dataclass
class Interval:
    index: int
    kind: str  # "interrupt" or "request"
    start_ns: int
    end_ns: int
    trace_id: str
    request: Span  # the GenAI span whose first token ends the interval
    cancelled: Span | None = None  # the interrupted stream, for interrupt intervals
    interrupt: Span | None = None  # the client.interrupt span, when the client recorded one
    children: list[Span] = field(default_factory=list)  # client.* children of ``request``
    warmup: bool = False
    iteration: int | None = None

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


def is_genai(span: Span) -> bool:
    """A call to an engine (its GenAI span, any known provider): where intervals start and end."""
    provider = span.get("attributes", {}).get(GEN_AI_PROVIDER_NAME)
    return isinstance(provider, str) and provider in GENAI_PROVIDERS  # a damaged row's list is no provider


def _first_token_ns(span: Span) -> int | None:
    value = span.get("attributes", {}).get(TRACER_FIRST_TOKEN_NS)
    return int(value) if value is not None else None


def _process_key(span: Span) -> tuple[Any, ...]:
    """Whose requests these are: an interrupt pairs a cancelled stream with the same client's next
    request. A proxy serves many clients from one process, so it names the client per span; in an
    instrumented process each thread is a client of its own (threads interrupt independently)."""
    resource = span.get("resource", {})
    attributes = span.get("attributes", {})
    return (resource.get(SERVICE_NAME), resource.get(PROCESS_PID), resource.get(SERVICE_INSTANCE_ID),
            attributes.get(TRACER_CLIENT_KEY), attributes.get(THREAD_ID))


def seen_from_server(span: Span) -> bool:
    """A request only the server's side recorded (eBPF): ``tracer attach``'s, or one no client span had."""
    return bool(span.get("attributes", {}).get(TRACER_SOURCE) == SOURCE_EBPF)


def _follows(cancelled: Span, start: int) -> bool:
    """Is a request starting at ``start`` the next one after the interrupt of ``cancelled``? Within
    ``INTERRUPT_WINDOW_NS`` of its end. A stream only the server saw (eBPF) ends when the server
    noticed the close, which can be after the client's next request arrived (Go notices on its
    next failed write): then it still pairs, and the interval starts at the next request."""
    gap = start - int(cancelled["endTimeUnixNano"])
    if gap < 0 and seen_from_server(cancelled):
        return int(cancelled["startTimeUnixNano"]) < start
    return 0 <= gap <= INTERRUPT_WINDOW_NS


def find_intervals(spans: list[Span]) -> list[Interval]:
    genai = sorted((s for s in spans if is_genai(s)), key=lambda s: int(s["startTimeUnixNano"]))
    by_parent: dict[str, list[Span]] = {}
    by_id: dict[str, Span] = {}
    for span in spans:
        by_id[span["spanId"]] = span
        by_parent.setdefault(span.get("parentSpanId") or "", []).append(span)
    intervals: list[Interval] = []
    previous_cancelled: dict[tuple[Any, ...], Span] = {}
    for span in genai:
        attributes = span.get("attributes", {})
        key = _process_key(span)
        if attributes.get(TRACER_CANCELLED):
            previous_cancelled[key] = span
            continue
        first_token = _first_token_ns(span)
        if first_token is None:
            continue  # failed before any token: nothing to attribute
        start = int(span["startTimeUnixNano"])
        cancelled = previous_cancelled.pop(key, None)
        interrupt_span: Span | None = None
        kind = "request"
        if cancelled is not None and _follows(cancelled, start):
            kind = "interrupt"
            siblings = by_parent.get(span.get("parentSpanId") or "", [])
            interrupts = [s for s in siblings if s["name"] == CLIENT_INTERRUPT and s["traceId"] == span["traceId"]]
            if interrupts:
                interrupt_span = interrupts[-1]
                start = int(interrupt_span["startTimeUnixNano"])
            else:
                start = min(start, int(cancelled["endTimeUnixNano"]))
        root = by_id.get(span.get("parentSpanId") or "")
        root_attributes = root.get("attributes", {}) if root else {}
        intervals.append(
            Interval(
                index=len(intervals),
                kind=kind,
                start_ns=start,
                end_ns=first_token,
                trace_id=span["traceId"],
                request=span,
                cancelled=cancelled if kind == "interrupt" else None,
                interrupt=interrupt_span,
                children=[c for c in by_parent.get(span["spanId"], [])
                          if c["name"].startswith(process_prefix(PROCESS_CLIENT))],
                warmup=bool(root_attributes.get(TRACER_WARMUP, False)),
                iteration=root_attributes.get(TRACER_ITERATION_INDEX),
            )
        )
    return intervals
