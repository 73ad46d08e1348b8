"""Send a capture's spans to an OTLP endpoint (Jaeger) with the standard OTel exporter.

Rows of ``spans.jsonl`` become SDK ``ReadableSpan`` objects with their original trace and span
ids, grouped by service (``ollama-client``, ``ollama-server``, ``ollama-runner``), so Jaeger
shows each iteration as one trace with its phases in their real processes. A failed export
loses nothing: the capture directory still holds every span, and ``tracer export`` retries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.otel_setup import make_otlp_exporter
from ollama_tracer.vocabulary import SERVICE_CLIENT, SERVICE_NAME
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

PROTOCOLS = ("grpc", "http/protobuf")
BATCH = 512


def protocol_for(endpoint: str, protocol: str | None) -> str:
    """gRPC unless told otherwise; an endpoint on port 4318 or with a path means OTLP/HTTP."""
    if protocol is not None:
        if protocol not in PROTOCOLS:
            raise TracerError(f"unknown --otlp-protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}.",
                              ExitCode.USAGE)
        return protocol
    parts = urlsplit(endpoint)
    if parts.port == 4318 or parts.path.rstrip("/") not in ("",):
        return "http/protobuf"
    return "grpc"


def _value(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(str(v) if isinstance(v, dict) else v for v in value)
    if isinstance(value, dict):
        return str(value)
    return value


def to_readable(row: dict[str, Any], resources: dict[str, Resource]) -> ReadableSpan:
    service = row.get("service") or row.get("resource", {}).get(SERVICE_NAME) or SERVICE_CLIENT
    resource = resources.get(service)
    if resource is None:
        attrs = {k: _value(v) for k, v in row.get("resource", {}).items()}
        attrs[SERVICE_NAME] = service
        resource = resources[service] = Resource.create(attrs)
    trace_id = int(row["traceId"], 16)
    context = SpanContext(trace_id, int(row["spanId"], 16), is_remote=False, trace_flags=TraceFlags(1))
    parent = None
    if row.get("parentSpanId"):
        parent = SpanContext(trace_id, int(row["parentSpanId"], 16), is_remote=False, trace_flags=TraceFlags(1))
    status = row.get("status") or {}
    code = {0: StatusCode.UNSET, 1: StatusCode.OK, 2: StatusCode.ERROR}.get(int(status.get("code", 0)))
    events = [
        Event(e.get("name", ""), {k: _value(v) for k, v in e.get("attributes", {}).items()},
              int(e.get("timeUnixNano", 0)))
        for e in row.get("events", [])
    ]
    kind = {1: SpanKind.INTERNAL, 2: SpanKind.SERVER, 3: SpanKind.CLIENT, 4: SpanKind.PRODUCER,
            5: SpanKind.CONSUMER}.get(int(row.get("kind", 1)), SpanKind.INTERNAL)
    return ReadableSpan(
        name=row["name"], context=context, parent=parent, resource=resource,
        attributes={k: _value(v) for k, v in row.get("attributes", {}).items()}, events=events, kind=kind,
        status=Status(code or StatusCode.UNSET, status.get("message") or None),
        start_time=int(row["startTimeUnixNano"]), end_time=int(row["endTimeUnixNano"]),
    )


def export_rows(rows: Sequence[dict[str, Any]], endpoint: str, protocol: str | None = None,
                timeout_s: float = 10.0) -> dict[str, Any]:
    """Export every row; raises TracerError(EXPORT_FAILED) when the endpoint refuses them."""
    protocol = protocol_for(endpoint, protocol)
    exporter = make_otlp_exporter(endpoint, protocol)
    if hasattr(exporter, "_timeout"):
        exporter._timeout = timeout_s
    resources: dict[str, Resource] = {}
    spans = [to_readable(row, resources) for row in rows]
    sent = 0
    # The exporter logs each retry; the one-sentence error below says all the user needs.
    exporter_log = logging.getLogger("opentelemetry.exporter.otlp")
    previous_level = exporter_log.level
    exporter_log.setLevel(logging.CRITICAL)
    try:
        for start in range(0, len(spans), BATCH):
            batch = spans[start:start + BATCH]
            if exporter.export(batch) is not SpanExportResult.SUCCESS:
                raise TracerError(
                    f"the OTLP endpoint {endpoint} ({protocol}) did not accept the spans ({sent} of {len(spans)} "
                    "sent); nothing is lost: start it and run `tracer export DIR --otlp-endpoint URL`.",
                    ExitCode.EXPORT_FAILED,
                )
            sent += len(batch)
    finally:
        exporter.shutdown()
        exporter_log.setLevel(previous_level)
    return {"endpoint": endpoint, "protocol": protocol, "exported_spans": sent,
            "services": sorted(resources)}
