"""Client spans: an OTLP receiver embedded in the capture; the child exports to it over loopback."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ollama_tracer import vocabulary as v
from ollama_tracer.capture_files import CLIENT_SPANS, JsonlAppender, read_jsonl
from ollama_tracer.clock import ClockModel
from ollama_tracer.collectors.base import SessionInfo

if TYPE_CHECKING:  # the receiver (gRPC) is loaded only by a capture that runs it, not to read one back
    from ollama_tracer.collectors.otlp_receiver import OtlpReceiver


class OtlpCollector:
    name = "client_spans"

    def __init__(self, protocol: str = "grpc") -> None:
        self.protocol = protocol
        self._receiver: OtlpReceiver | None = None
        self._out: JsonlAppender | None = None

    def available(self) -> tuple[bool, str]:
        return True, ""

    def start(self, session: SessionInfo) -> None:
        self._out = JsonlAppender(session.directory / CLIENT_SPANS)
        from ollama_tracer.collectors.otlp_receiver import OtlpReceiver

        self._receiver = OtlpReceiver(on_spans=self._out.append)
        self._receiver.start()
        endpoint = self._receiver.grpc_endpoint if self.protocol == "grpc" else self._receiver.http_endpoint
        session.child_env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        session.child_env["OTEL_EXPORTER_OTLP_PROTOCOL"] = self.protocol

    def child_started(self, pid: int) -> None:
        pass

    def stop(self) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        if self._receiver is not None:
            self._receiver.stop()
            stats = self._receiver.stats()
        if self._out is not None:
            self._out.close()
            stats["written_spans"] = self._out.rows - self._out.lost
            stats.update(self._out.stats())
        return stats


@dataclass
class ClientSpans:
    """The spans the capture's children exported, as the receiver wrote them."""

    spans: list[dict[str, Any]]
    unreadable: dict[str, int] = field(default_factory=dict)


def load(directory: Path, clock: ClockModel | None) -> ClientSpans | None:
    """The spans of ``raw/client_spans.jsonl``; a row that is JSON but not a span as the receiver
    writes one counts as unreadable."""
    if not (directory / CLIENT_SPANS).exists():
        return None
    rows, bad = read_jsonl(directory / CLIENT_SPANS)
    spans = [row for row in rows if usable_span(row)]
    return ClientSpans(with_client_moments(spans), {CLIENT_SPANS: bad + len(rows) - len(spans)})


def with_client_moments(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``spans`` with the ``client.request`` and ``client.first_token`` child spans of each GenAI
    span that carried its moments as attributes only (instrument.moments: a capture's client
    exports one span per call), as the instrumentation would have exported them: the same times,
    kind, attribute and resource, an id derived from the parent's. Children a client did export
    are kept as they are, and never doubled."""
    exported = {(s.get("parentSpanId") or "", s["name"]) for s in spans  # "" as usable_span reads a falsy one
                if s["name"] in (v.CLIENT_REQUEST, v.CLIENT_FIRST_TOKEN)}
    out: list[dict[str, Any]] = []
    for span in spans:
        attributes = span.get("attributes", {})
        if v.GEN_AI_OPERATION_NAME in attributes:
            written, first = attributes.get(v.TRACER_REQUEST_WRITTEN_NS), attributes.get(v.TRACER_FIRST_TOKEN_NS)
            start = attributes.get(v.TRACER_RESPONSE_START_NS) or first
            for name, begin, end in ((v.CLIENT_REQUEST, span["startTimeUnixNano"], written),
                                     (v.CLIENT_FIRST_TOKEN, start, first)):
                if end is not None and begin is not None and (span["spanId"], name) not in exported:
                    out.append(_child(span, name, int(begin), int(end)))
        out.append(span)
    return out


def _child(parent: dict[str, Any], name: str, start_ns: int, end_ns: int) -> dict[str, Any]:
    span_id = hashlib.blake2b(f"{parent['traceId']}/{parent['spanId']}/{name}".encode(), digest_size=8).hexdigest()
    return {"traceId": parent["traceId"], "spanId": span_id, "parentSpanId": parent["spanId"], "name": name,
            "kind": 1, "startTimeUnixNano": start_ns, "endTimeUnixNano": end_ns,
            "attributes": {v.TRACER_SOURCE: v.SOURCE_CLIENT}, "events": [], "status": {"code": 0, "message": ""},
            "resource": dict(parent.get("resource", {})),
            **({"service": parent["service"]} if "service" in parent else {})}


# Attributes that attribution reads as integers: epoch ns, durations, a port, an fd.
_INTEGER_ATTRIBUTES = (v.TRACER_FIRST_TOKEN_NS, v.TRACER_REQUEST_WRITTEN_NS, v.TRACER_RESPONSE_START_NS,
                       v.OLLAMA_CREATED_AT_FIRST_NS, v.OLLAMA_CREATED_AT_LAST_NS, v.OLLAMA_TOTAL_DURATION,
                       v.OLLAMA_LOAD_DURATION, v.OLLAMA_PROMPT_EVAL_DURATION, v.TRACER_LOCAL_PORT, v.SERVER_FD)
# What tells one client from another (attribution.intervals): dictionary keys, so never a list or an object.
_CLIENT_KEYS = (("resource", v.SERVICE_NAME), ("resource", v.PROCESS_PID), ("resource", v.SERVICE_INSTANCE_ID),
                ("attributes", v.TRACER_CLIENT_KEY), ("attributes", v.THREAD_ID))
_SCALARS = (str, int, float, bool, type(None))


def usable_span(row: dict[str, Any]) -> bool:
    """Whether a row of client_spans.jsonl has, in what attribution reads, the shape the receiver writes."""
    attributes, resource = row.get("attributes", {}), row.get("resource", {})
    if not (isinstance(attributes, dict) and isinstance(resource, dict)):
        return False
    maps = {"attributes": attributes, "resource": resource}
    return (all(isinstance(row.get(key), str) for key in ("traceId", "spanId", "name"))
            and isinstance(row.get("parentSpanId") or "", str) and isinstance(row.get("events", []), list)
            and all(_is_int(row.get(key)) and row[key] >= 0 for key in ("startTimeUnixNano", "endTimeUnixNano"))
            and all(attributes.get(key) is None or _is_int(attributes[key]) for key in _INTEGER_ATTRIBUTES)
            # A stream that reached `done` (total_duration) had chunks: their times come with it.
            and (attributes.get(v.OLLAMA_TOTAL_DURATION) is None
                 or None not in (attributes.get(key) for key in (v.OLLAMA_CREATED_AT_FIRST_NS,
                                                                 v.OLLAMA_CREATED_AT_LAST_NS)))
            and all(isinstance(maps[where].get(key), _SCALARS) for where, key in _CLIENT_KEYS))


def _is_int(value: Any) -> bool:
    """A JSON integer (not a bool) that fits in 64 bits."""
    return type(value) is int and abs(value) < 2**64
