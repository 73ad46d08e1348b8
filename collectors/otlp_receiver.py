"""An OTLP trace receiver that runs inside the tracer, so a capture needs no Collector or Jaeger.

The traced program keeps its own OpenTelemetry SDK and exports to us over loopback, exactly as
it would export to a real backend. There is no pure-Python OTLP receiver on PyPI; ``grpcio`` and
``opentelemetry-proto`` (both brought in by ``opentelemetry-exporter-otlp``) are enough to be one.

Two promises shape this module:

* nothing is dropped silently: every request we refuse, and every span we cannot hand on, is
  counted in :meth:`OtlpReceiver.stats`, and the client is told with a proper 4xx/5xx or gRPC
  status so that its own exporter logs it as well;
* a bad client can never take the receiver down: malformed payloads are answered and counted,
  and the server keeps serving.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import socketserver
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final
from urllib.parse import urlsplit

import grpc
from google.protobuf import json_format  # type: ignore[import-untyped, unused-ignore]
from google.protobuf import message as protobuf_message  # type: ignore[import-untyped, unused-ignore]
from google.rpc import status_pb2  # type: ignore[import-untyped, unused-ignore]
from ollama_tracer.errors import ExitCode, TracerError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

logger = logging.getLogger(__name__)

SpanDict = dict[str, Any]
SpanSink = Callable[[list[SpanDict]], None]

# Loopback only: the receiver accepts unauthenticated writes, so it must never face a network.
LOOPBACK_HOST: Final = "127.0.0.1"
TRACES_PATH: Final = "/v1/traces"
# Far above what an SDK batch needs (512 spans is well under 1 MiB), yet bounded, so one
# broken client cannot make us buffer gigabytes.
MAX_REQUEST_BYTES: Final = 64 * 1024 * 1024
# Each gzip member after the first costs a copy of the rest of the body (zlib's unused_data), so a
# body of a million tiny members would take minutes; real ones have one, or a few when concatenated.
_MAX_GZIP_MEMBERS: Final = 32

_PROTOBUF_CONTENT_TYPE: Final = "application/x-protobuf"
_JSON_CONTENT_TYPE: Final = "application/json"
_GRPC_SERVICE: Final = "opentelemetry.proto.collector.trace.v1.TraceService"
# OTLP-JSON writes these bytes fields as hex, while protobuf's JSON mapping expects base64.
_HEX_ID_FIELDS: Final = frozenset({"traceId", "spanId", "parentSpanId"})
# google.rpc.Code values for the error body that OTLP/HTTP asks for.
_RPC_CODE_FOR_HTTP_STATUS: Final = {
    HTTPStatus.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT.value[0],
    HTTPStatus.NOT_FOUND: grpc.StatusCode.NOT_FOUND.value[0],
    HTTPStatus.METHOD_NOT_ALLOWED: grpc.StatusCode.UNIMPLEMENTED.value[0],
    HTTPStatus.LENGTH_REQUIRED: grpc.StatusCode.INVALID_ARGUMENT.value[0],
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: grpc.StatusCode.INVALID_ARGUMENT.value[0],
    HTTPStatus.INTERNAL_SERVER_ERROR: grpc.StatusCode.INTERNAL.value[0],
    HTTPStatus.SERVICE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE.value[0],
}


# --------------------------------------------------------------------------------------------
# Conversion: one shape for every span, whatever protocol it came in on.
# --------------------------------------------------------------------------------------------


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
        service = resource.get("service.name", "")
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


def _has_valid_ids(span: SpanDict) -> bool:
    # All-zero and wrong-length IDs cannot be joined to anything; OTLP says to reject them.
    trace_id, span_id = span["traceId"], span["spanId"]
    return (
        len(trace_id) == 32 and len(span_id) == 16 and trace_id.strip("0") != "" and span_id.strip("0") != ""
    )


class _MalformedPayload(Exception):
    """A request we refuse; ``reason`` is the stable key it is counted under in ``stats()``."""

    def __init__(self, reason: str, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status


def _parse_protobuf(body: bytes) -> Any:
    request = trace_service_pb2.ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except (protobuf_message.DecodeError, RuntimeError, ValueError) as exc:
        raise _MalformedPayload(
            "malformed_protobuf", f"body is not an ExportTraceServiceRequest: {exc}"
        ) from exc
    return request


def _parse_json(body: bytes) -> Any:
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
        raise _MalformedPayload("malformed_json", f"body is not OTLP-JSON: {exc}") from exc


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


def _gunzip(body: bytes) -> bytes:
    # Decompress incrementally so a small "zip bomb" cannot expand past the size limit. A body may
    # hold several gzip members (RFC 1952 §2.2; Go's and Python's readers take them all): every
    # member is read, under one limit, or the spans of all but the first would vanish unanswered.
    data = bytearray()  # not bytes: a body of many tiny members must not be copied once per member
    for _ in range(_MAX_GZIP_MEMBERS):
        decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            data += decompressor.decompress(body, MAX_REQUEST_BYTES + 1 - len(data))
        except zlib.error as exc:
            raise _MalformedPayload("malformed_gzip", f"body is not valid gzip: {exc}") from exc
        if len(data) > MAX_REQUEST_BYTES:
            raise _MalformedPayload(
                "payload_too_large",
                f"decompressed body exceeds {MAX_REQUEST_BYTES} bytes",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        if not decompressor.eof:
            raise _MalformedPayload("malformed_gzip", "gzip body is truncated")
        body = decompressor.unused_data.lstrip(b"\0")  # zero padding after the last member, as gzip's reader allows
        if not body:
            return bytes(data)
    raise _MalformedPayload("malformed_gzip", f"gzip body has more than {_MAX_GZIP_MEMBERS} members")


# --------------------------------------------------------------------------------------------
# The receiver.
# --------------------------------------------------------------------------------------------


class OtlpReceiver:
    """Receives OTLP traces over HTTP and gRPC on loopback and hands them to one sink.

    Both protocols are served because the SDK's exporter choice belongs to the traced program
    (``OTEL_EXPORTER_OTLP_PROTOCOL``), not to us. Ports come from the OS (port 0) so parallel
    captures and tests never collide.

    ``on_spans`` is called with each request's spans, never concurrently, so it need not be
    thread-safe. Without one, spans are kept in memory and :meth:`spans` returns them. If the
    sink raises, the client gets an error and the spans are counted as dropped.
    """

    def __init__(self, on_spans: SpanSink | None = None, *, grpc_workers: int = 4) -> None:
        self._collected: list[SpanDict] = []
        self._sink: SpanSink = on_spans if on_spans is not None else self._collected.extend
        self._sink_lock = threading.Lock()
        self._grpc_workers = grpc_workers

        self._stats_lock = threading.Lock()
        self._received_requests = 0
        self._received_spans = 0
        self._rejected_requests = 0
        self._rejected_spans = 0
        self._dropped_spans = 0
        self._reasons: Counter[str] = Counter()

        self._lifecycle_lock = threading.Lock()
        self._state = "new"
        # Guards the HTTP drain: requests in flight and connections still open.
        self._http_cond = threading.Condition()
        self._http_accepting = False
        self._http_in_flight = 0
        self._http_connections: set[socket.socket] = set()

        self._http_server: _OtlpHttpServer | None = None
        self._http_thread: threading.Thread | None = None
        self._grpc_server: Any = None
        self._grpc_executor: ThreadPoolExecutor | None = None
        self._http_port = 0
        self._grpc_port = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bind both listeners before returning, so the endpoints are usable at once."""
        with self._lifecycle_lock:
            if self._state != "new":
                raise RuntimeError("an OtlpReceiver can be started only once; create a new one")
            try:
                http_server = _OtlpHttpServer((LOOPBACK_HOST, 0), self)
            except OSError as exc:
                raise TracerError(
                    f"Could not open the OTLP/HTTP receiver on {LOOPBACK_HOST} ({exc}); "
                    "check that the loopback interface is up.",
                    ExitCode.FAILURE,
                ) from exc
            executor = ThreadPoolExecutor(max_workers=self._grpc_workers, thread_name_prefix="otlp-grpc")
            grpc_server = grpc.server(
                executor,
                options=[
                    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                    # Without this gRPC sets SO_REUSEPORT, and two receivers could share a port.
                    ("grpc.so_reuseport", 0),
                ],
            )
            grpc_server.add_generic_rpc_handlers((_trace_service_handler(_TraceService(self)),))
            try:
                grpc_port = int(grpc_server.add_insecure_port(f"{LOOPBACK_HOST}:0"))
            except RuntimeError:
                grpc_port = 0
            if grpc_port == 0:
                http_server.server_close()
                executor.shutdown(wait=False)
                raise TracerError(
                    f"Could not open the OTLP/gRPC receiver on {LOOPBACK_HOST}; "
                    "check that the loopback interface is up.",
                    ExitCode.FAILURE,
                )
            grpc_server.start()
            with self._http_cond:
                self._http_accepting = True
            http_thread = threading.Thread(
                target=http_server.serve_forever, kwargs={"poll_interval": 0.1}, name="otlp-http", daemon=True
            )
            http_thread.start()

            self._http_server, self._http_thread = http_server, http_thread
            self._grpc_server, self._grpc_executor = grpc_server, executor
            self._http_port, self._grpc_port = int(http_server.server_address[1]), grpc_port
            self._state = "running"
        logger.debug("OTLP receiver listening: http=%s grpc=%s", self.http_endpoint, self.grpc_endpoint)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, let requests already in flight reach the sink, then release the ports.

        Draining matters because an SDK flushes its last batch just before the traced program
        exits, often moments before we are told to stop. Requests that arrive on an old
        keep-alive connection after this point get 503, which the client logs; they are not
        lost silently. Calling stop() again is harmless.
        """
        with self._lifecycle_lock:
            if self._state != "running":
                self._state = "stopped"
                return
            self._state = "stopping"
        assert self._http_server is not None and self._http_thread is not None
        assert self._grpc_executor is not None
        deadline = time.monotonic() + timeout_s

        def remaining() -> float:
            return max(0.0, deadline - time.monotonic())

        grpc_stopped = self._grpc_server.stop(grace=timeout_s)
        self._http_server.shutdown()
        self._http_thread.join(remaining())
        self._http_server.server_close()
        with self._http_cond:
            self._http_accepting = False
            drained = self._http_cond.wait_for(lambda: self._http_in_flight == 0, remaining())
            idle_connections = list(self._http_connections)
        if not drained:
            logger.warning(
                "OTLP receiver stopped with %d HTTP requests still in flight", self._http_in_flight
            )
        # Idle keep-alive connections would otherwise sit in readline() until their timeout.
        for connection in idle_connections:
            with contextlib.suppress(OSError):  # the client closed it already
                connection.shutdown(socket.SHUT_RDWR)
        with self._http_cond:
            self._http_cond.wait_for(lambda: not self._http_connections, remaining())
        if not grpc_stopped.wait(remaining()):
            logger.warning("OTLP receiver stopped before all gRPC requests finished")
        self._grpc_executor.shutdown(wait=grpc_stopped.is_set())
        with self._lifecycle_lock:
            self._state = "stopped"

    def __enter__(self) -> OtlpReceiver:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what callers read -------------------------------------------------------------------

    @property
    def http_endpoint(self) -> str:
        """Base URL; the OTLP/HTTP exporter wants it with ``/v1/traces`` appended."""
        return f"http://{LOOPBACK_HOST}:{self._port(self._http_port)}"

    @property
    def grpc_endpoint(self) -> str:
        """The ``http://`` scheme tells the gRPC exporter to connect without TLS."""
        return f"http://{LOOPBACK_HOST}:{self._port(self._grpc_port)}"

    def _port(self, port: int) -> int:
        if port == 0:
            raise RuntimeError("the receiver has no port until start() is called")
        return port

    def spans(self) -> list[SpanDict]:
        """A snapshot, so callers can iterate while spans keep arriving.

        Only the default sink fills this; with ``on_spans`` given it stays empty.
        """
        with self._sink_lock:
            return list(self._collected)

    def stats(self) -> dict[str, Any]:
        """Counters that make every refused request and lost span visible to the capture."""
        with self._stats_lock:
            return {
                "received_requests": self._received_requests,
                "received_spans": self._received_spans,
                "rejected_requests": self._rejected_requests,
                "rejected_spans": self._rejected_spans,
                "dropped_spans": self._dropped_spans,
                "reasons": dict(self._reasons),
            }

    # -- shared by both protocols ------------------------------------------------------------

    def _count_rejected(self, reason: str) -> None:
        with self._stats_lock:
            self._rejected_requests += 1
            self._reasons[reason] += 1

    def _accept(self, request: Any) -> tuple[int, str]:
        """Hand a decoded request's spans to the sink; returns (rejected spans, why).

        Raises whatever the sink raised, after counting the spans as dropped, so each protocol
        can answer with its own error status.
        """
        spans = spans_from_request(request)
        valid = [span for span in spans if _has_valid_ids(span)]
        rejected = len(spans) - len(valid)
        if valid:
            try:
                with self._sink_lock:
                    self._sink(valid)
            except Exception:
                logger.exception("The span sink failed; %d spans were dropped", len(valid))
                with self._stats_lock:
                    self._rejected_requests += 1
                    self._reasons["sink_error"] += 1
                    self._dropped_spans += len(valid)
                raise
        with self._stats_lock:
            self._received_requests += 1
            self._received_spans += len(valid)
            if rejected:
                self._rejected_spans += rejected
                self._reasons["invalid_span_id"] += 1
        message = f"{rejected} spans had an invalid or all-zero traceId/spanId" if rejected else ""
        return rejected, message

    def _http_connection_opened(self, connection: socket.socket) -> None:
        with self._http_cond:
            self._http_connections.add(connection)

    def _http_connection_closed(self, connection: socket.socket) -> None:
        with self._http_cond:
            self._http_connections.discard(connection)
            self._http_cond.notify_all()

    def _http_request_begins(self) -> bool:
        with self._http_cond:
            if not self._http_accepting:
                return False
            self._http_in_flight += 1
            return True

    def _http_request_ends(self) -> None:
        with self._http_cond:
            self._http_in_flight -= 1
            self._http_cond.notify_all()


def _response(rejected_spans: int, error_message: str) -> Any:
    # An empty response means full success; partial_success is set only when spans were refused.
    response = trace_service_pb2.ExportTraceServiceResponse()
    if rejected_spans:
        response.partial_success.rejected_spans = rejected_spans
        response.partial_success.error_message = error_message
    return response


# --------------------------------------------------------------------------------------------
# OTLP/HTTP
# --------------------------------------------------------------------------------------------


class _OtlpHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], receiver: OtlpReceiver) -> None:
        self.receiver = receiver
        super().__init__(address, _OtlpHttpHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) that can stall for seconds.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that vanishes mid-request is routine; the default prints a traceback to stderr.
        logger.debug("OTLP/HTTP connection from %s failed", client_address, exc_info=True)


class _OtlpHttpHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive: the SDK's requests.Session reuses one connection per exporter.
    protocol_version = "HTTP/1.1"
    # Idle keep-alive connections are closed after this many seconds.
    timeout = 30
    server: _OtlpHttpServer

    def setup(self) -> None:
        super().setup()
        self.server.receiver._http_connection_opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.receiver._http_connection_closed(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("OTLP/HTTP %s - " + format, self.address_string(), *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Only the stdlib calls this (bad request line, oversize headers); count those too.
        self.server.receiver._count_rejected("bad_http_request")
        super().send_error(code, message, explain)

    def do_POST(self) -> None:
        receiver = self.server.receiver
        if not receiver._http_request_begins():
            self._reject(HTTPStatus.SERVICE_UNAVAILABLE, "receiver_stopped", "the receiver is stopping")
            return
        try:
            self._handle_export(receiver)
        except Exception:
            logger.exception("OTLP/HTTP request handling failed")
            self._reject(HTTPStatus.INTERNAL_SERVER_ERROR, "internal_error", "the receiver failed")
        finally:
            receiver._http_request_ends()

    def _handle_export(self, receiver: OtlpReceiver) -> None:
        if urlsplit(self.path).path != TRACES_PATH:
            self._reject(HTTPStatus.NOT_FOUND, "not_found", f"only {TRACES_PATH} is served")
            return
        content_type = self.headers.get_content_type()
        if content_type not in (_PROTOBUF_CONTENT_TYPE, _JSON_CONTENT_TYPE):
            self._reject(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                f"Content-Type must be {_PROTOBUF_CONTENT_TYPE} or {_JSON_CONTENT_TYPE}, not {content_type}",
            )
            return
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("identity", "gzip"):
            self._reject(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                "unsupported_encoding",
                f"Content-Encoding {encoding} is not supported; use gzip or none",
            )
            return
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self._reject(HTTPStatus.LENGTH_REQUIRED, "length_required", "Content-Length is required")
            return
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError(length_header)
        except ValueError:
            self._reject(
                HTTPStatus.BAD_REQUEST, "bad_content_length", f"bad Content-Length {length_header!r}"
            )
            return
        if length > MAX_REQUEST_BYTES:
            self._reject(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "payload_too_large",
                f"body of {length} bytes exceeds {MAX_REQUEST_BYTES} bytes",
            )
            return
        body = self.rfile.read(length)
        if len(body) < length:
            # The client hung up mid-body: nobody is left to answer, but it still counts.
            receiver._count_rejected("truncated_body")
            self.close_connection = True
            return
        # From here the body has been read, so the connection can stay open whatever we answer.
        try:
            if encoding == "gzip":
                body = _gunzip(body)
            parse = _parse_json if content_type == _JSON_CONTENT_TYPE else _parse_protobuf
            request = parse(body)
        except _MalformedPayload as exc:
            self._reject(exc.status, exc.reason, exc.message, keep_alive=True)
            return
        try:
            rejected_spans, error_message = receiver._accept(request)
        except Exception:
            # Already counted by _accept; the client must learn that these spans are gone.
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            self._send(status, *self._status_body(status, "the span sink failed"))
            return
        response = _response(rejected_spans, error_message)
        if content_type == _JSON_CONTENT_TYPE:
            self._send(
                HTTPStatus.OK, _JSON_CONTENT_TYPE, json.dumps(json_format.MessageToDict(response)).encode()
            )
        else:
            self._send(HTTPStatus.OK, _PROTOBUF_CONTENT_TYPE, response.SerializeToString())

    def _method_not_allowed(self) -> None:
        if urlsplit(self.path).path != TRACES_PATH:
            self._reject(HTTPStatus.NOT_FOUND, "not_found", f"only POST {TRACES_PATH} is served")
        else:
            self._reject(HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed", f"use POST {TRACES_PATH}")

    do_GET = do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def _reject(self, status: HTTPStatus, reason: str, message: str, *, keep_alive: bool = False) -> None:
        """Count and answer a refused request.

        Unless the body has been read, the connection is closed: the unread bytes would
        otherwise be parsed as the next request.
        """
        self.server.receiver._count_rejected(reason)
        if not keep_alive:
            self.close_connection = True
        self._send(status, *self._status_body(status, message))

    def _status_body(self, status: HTTPStatus, message: str) -> tuple[str, bytes]:
        # OTLP/HTTP wants a google.rpc.Status in the request's own encoding; anything else
        # gets plain text, which is what a person poking with curl can read.
        rpc_status = status_pb2.Status(code=_RPC_CODE_FOR_HTTP_STATUS.get(status, 2), message=message)
        content_type = self.headers.get_content_type()
        if content_type == _PROTOBUF_CONTENT_TYPE:
            return _PROTOBUF_CONTENT_TYPE, rpc_status.SerializeToString()
        if content_type == _JSON_CONTENT_TYPE:
            return _JSON_CONTENT_TYPE, json.dumps(json_format.MessageToDict(rpc_status)).encode()
        return "text/plain; charset=utf-8", (message + "\n").encode()

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "POST")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


# --------------------------------------------------------------------------------------------
# OTLP/gRPC
# --------------------------------------------------------------------------------------------


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        if isinstance(request, _MalformedPayload):
            self._receiver._count_rejected(request.reason)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            rejected_spans, error_message = self._receiver._accept(request)
        except Exception:
            context.abort(grpc.StatusCode.INTERNAL, "the span sink failed")
        return _response(rejected_spans, error_message)


def _decode_grpc_request(body: bytes) -> Any:
    # gRPC answers a deserializer exception with INTERNAL and never tells us; returning the
    # error lets Export count it and answer INVALID_ARGUMENT, as OTLP asks.
    try:
        return _parse_protobuf(body)
    except _MalformedPayload as exc:
        return exc


def _trace_service_handler(service: _TraceService) -> Any:
    # add_TraceServiceServicer_to_server would fix the deserializer to FromString; this is the
    # same registration with ours.
    return grpc.method_handlers_generic_handler(
        _GRPC_SERVICE,
        {
            "Export": grpc.unary_unary_rpc_method_handler(
                service.Export,
                request_deserializer=_decode_grpc_request,
                response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
            )
        },
    )
