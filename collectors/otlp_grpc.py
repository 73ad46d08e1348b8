"""The OTLP/gRPC server: ``TraceService/Export``, with a deserializer that lets a bad body be counted.

gRPC answers a deserializer exception with INTERNAL and never tells the service; here a body that
does not parse reaches :meth:`TraceService.Export` as a :class:`MalformedPayload`, which counts it
and answers INVALID_ARGUMENT, as OTLP asks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import grpc
from ollama_tracer.collectors.otlp_convert import (
    MAX_REQUEST_BYTES,
    AcceptSpans,
    CountRejected,
    MalformedPayload,
    export_response,
    parse_protobuf,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

_GRPC_SERVICE: Final = "opentelemetry.proto.collector.trace.v1.TraceService"


def new_server(executor: ThreadPoolExecutor, accept_spans: AcceptSpans, count_rejected: CountRejected) -> Any:
    """A gRPC server (not yet listening: add a port, then start it) that serves TraceService."""
    server = grpc.server(
        executor,
        options=[
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            # Without this gRPC sets SO_REUSEPORT, and two receivers could share a port.
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers((trace_service_handler(TraceService(accept_spans, count_rejected)),))
    return server


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, accept_spans: AcceptSpans, count_rejected: CountRejected) -> None:
        self._accept_spans = accept_spans
        self._count_rejected = count_rejected

    def Export(self, request: Any, context: Any) -> Any:
        if isinstance(request, MalformedPayload):
            self._count_rejected(request.reason)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            rejected_spans, error_message = self._accept_spans(request)
        except Exception:
            context.abort(grpc.StatusCode.INTERNAL, "the span sink failed")
        return export_response(rejected_spans, error_message)


def decode_request(body: bytes) -> Any:
    # gRPC answers a deserializer exception with INTERNAL and never tells us; returning the
    # error lets Export count it and answer INVALID_ARGUMENT, as OTLP asks.
    try:
        return parse_protobuf(body)
    except MalformedPayload as exc:
        return exc


def trace_service_handler(service: TraceService) -> Any:
    # add_TraceServiceServicer_to_server would fix the deserializer to FromString; this is the
    # same registration with ours.
    return grpc.method_handlers_generic_handler(
        _GRPC_SERVICE,
        {
            "Export": grpc.unary_unary_rpc_method_handler(
                service.Export,
                request_deserializer=decode_request,
                response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
            )
        },
    )
