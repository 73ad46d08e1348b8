"""OTLP trace requests turned into our rows: one shape for every span, whatever protocol it came in on.

Both servers (``collectors.otlp_http``, ``collectors.otlp_grpc``) decode a body with
:func:`parse_protobuf` / :func:`parse_json` (after :func:`gunzip`), refuse what they cannot read
with :class:`MalformedPayload`, and hand the request to :func:`spans_from_request`, whose dicts
are the rows of ``spans.jsonl``.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, Final

from google.protobuf import json_format  # type: ignore[import-untyped, unused-ignore]
from google.protobuf import message as protobuf_message  # type: ignore[import-untyped, unused-ignore]
from ollama_tracer.vocabulary import SERVICE_NAME
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

SpanDict = dict[str, Any]
# What a server hands a decoded request to (it returns the rejected spans and why), and how it
# counts a refused request under its reason.
AcceptSpans = Callable[[Any], tuple[int, str]]
CountRejected = Callable[[str], None]

# Far above what an SDK batch needs (512 spans is well under 1 MiB), yet bounded, so one
# broken client cannot make us buffer gigabytes.
MAX_REQUEST_BYTES: Final = 64 * 1024 * 1024
# Each gzip member after the first costs a copy of the rest of the body (zlib's unused_data), so a
# body of a million tiny members would take minutes; real ones have one, or a few when concatenated.
_MAX_GZIP_MEMBERS: Final = 32
# OTLP-JSON writes these bytes fields as hex, while protobuf's JSON mapping expects base64.
_HEX_ID_FIELDS: Final = frozenset({"traceId", "spanId", "parentSpanId"})


def spans_from_request(request: Any) -> list[SpanDict]:
    """Flatten an ``ExportTraceServiceRequest`` into the OTLP-JSON-shaped dicts of ``spans.jsonl``.

    Resource attributes are copied onto every span (and ``service.name`` into ``service``)
    because downstream code groups spans by service and should not have to carry the
    resource/scope nesting around. IDs are hex, as in OTLP-JSON, so they can be compared with
    IDs seen in logs and in Jaeger. Enum fields (``kind``, ``status.code``) stay integers, as
    OTLP-JSON requires.
    """
    spans: list[SpanDict] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = resource.get(SERVICE_NAME, "")
        service_name = service if isinstance(service, str) else str(service)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    {
                        "traceId": span.trace_id.hex(),
                        "spanId": span.span_id.hex(),
                        "parentSpanId": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": int(span.kind),
                        "startTimeUnixNano": int(span.start_time_unix_nano),
                        "endTimeUnixNano": int(span.end_time_unix_nano),
                        "attributes": _attributes(span.attributes),
                        "events": [
                            {
                                "name": event.name,
                                "timeUnixNano": int(event.time_unix_nano),
                                "attributes": _attributes(event.attributes),
                            }
                            for event in span.events
                        ],
                        "status": {"code": int(span.status.code), "message": span.status.message},
                        # A copy per span, so a sink that edits one span cannot change another.
                        "resource": dict(resource),
                        "service": service_name,
                    }
                )
    return spans


def _attributes(key_values: Iterable[Any]) -> dict[str, Any]:
    return {key_value.key: _any_value(key_value.value) for key_value in key_values}


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        # base64, as OTLP-JSON writes bytes, so every value stays JSON-serialisable.
        return base64.b64encode(value.bytes_value).decode("ascii")
    return getattr(value, kind)


def has_valid_ids(span: SpanDict) -> bool:
    # All-zero and wrong-length IDs cannot be joined to anything; OTLP says to reject them.
    trace_id, span_id = span["traceId"], span["spanId"]
    return (
        len(trace_id) == 32 and len(span_id) == 16 and trace_id.strip("0") != "" and span_id.strip("0") != ""
    )


class MalformedPayload(Exception):
    """A request we refuse; ``reason`` is the stable key it is counted under in ``stats()``."""

    def __init__(self, reason: str, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status


def parse_protobuf(body: bytes) -> Any:
    request = trace_service_pb2.ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except (protobuf_message.DecodeError, RuntimeError, ValueError) as exc:
        raise MalformedPayload(
            "malformed_protobuf", f"body is not an ExportTraceServiceRequest: {exc}"
        ) from exc
    return request


def parse_json(body: bytes) -> Any:
    try:
        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError("the top level is not a JSON object")
        _hex_ids_to_base64(document)
        # Unknown fields are ignored, as OTLP-JSON asks, so newer clients still get through.
        return json_format.ParseDict(
            document, trace_service_pb2.ExportTraceServiceRequest(), ignore_unknown_fields=True
        )
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise MalformedPayload("malformed_json", f"body is not OTLP-JSON: {exc}") from exc


def _hex_ids_to_base64(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _HEX_ID_FIELDS and isinstance(value, str):
                try:
                    node[key] = base64.b64encode(bytes.fromhex(value)).decode("ascii")
                except ValueError as exc:
                    raise ValueError(f"{key} {value!r} is not hex") from exc
            else:
                _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids_to_base64(item)


def gunzip(body: bytes) -> bytes:
    # Decompress incrementally so a small "zip bomb" cannot expand past the size limit. A body may
    # hold several gzip members (RFC 1952 §2.2; Go's and Python's readers take them all): every
    # member is read, under one limit, or the spans of all but the first would vanish unanswered.
    data = bytearray()  # not bytes: a body of many tiny members must not be copied once per member
    for _ in range(_MAX_GZIP_MEMBERS):
        decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            data += decompressor.decompress(body, MAX_REQUEST_BYTES + 1 - len(data))
        except zlib.error as exc:
            raise MalformedPayload("malformed_gzip", f"body is not valid gzip: {exc}") from exc
        if len(data) > MAX_REQUEST_BYTES:
            raise MalformedPayload(
                "payload_too_large",
                f"decompressed body exceeds {MAX_REQUEST_BYTES} bytes",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        if not decompressor.eof:
            raise MalformedPayload("malformed_gzip", "gzip body is truncated")
        body = decompressor.unused_data.lstrip(b"\0")  # zero padding after the last member, as gzip's reader allows
        if not body:
            return bytes(data)
    raise MalformedPayload("malformed_gzip", f"gzip body has more than {_MAX_GZIP_MEMBERS} members")


def export_response(rejected_spans: int, error_message: str) -> Any:
    # An empty response means full success; partial_success is set only when spans were refused.
    response = trace_service_pb2.ExportTraceServiceResponse()
    if rejected_spans:
        response.partial_success.rejected_spans = rejected_spans
        response.partial_success.error_message = error_message
    return response
