"""The OTLP/HTTP server: ``POST /v1/traces`` in protobuf or JSON, gzip or not, on HTTP/1.1 keep-alive.

Every refused request is counted (``count_rejected``) and answered with the status OTLP/HTTP asks
for; the server tracks requests in flight and open connections so that the receiver can drain it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import urlsplit

import grpc
from google.protobuf import json_format  # type: ignore[import-untyped, unused-ignore]
from google.rpc import status_pb2  # type: ignore[import-untyped, unused-ignore]
from ollama_tracer.collectors.otlp_convert import (
    MAX_REQUEST_BYTES,
    AcceptSpans,
    CountRejected,
    MalformedPayload,
    export_response,
    gunzip,
    parse_json,
    parse_protobuf,
)

logger = logging.getLogger("ollama_tracer.collectors.otlp_receiver")  # the receiver's one logger, whichever part logs

TRACES_PATH: Final = "/v1/traces"
_PROTOBUF_CONTENT_TYPE: Final = "application/x-protobuf"
_JSON_CONTENT_TYPE: Final = "application/json"
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


class OtlpHttpServer(ThreadingHTTPServer):
    """OTLP/HTTP on ``address``: requests go to ``accept_spans``, refusals are counted by ``count_rejected``.

    It also keeps what :meth:`drain` needs: whether requests are accepted, how many are in flight,
    and which connections are open.
    """

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], accept_spans: AcceptSpans, count_rejected: CountRejected) -> None:
        self.accept_spans = accept_spans
        self.count_rejected = count_rejected
        # Guards the HTTP drain: requests in flight and connections still open.
        self._cond = threading.Condition()
        self._accepting = False
        self._in_flight = 0
        self._connections: set[socket.socket] = set()
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

    def start_accepting(self) -> None:
        with self._cond:
            self._accepting = True

    def drain(self, remaining: Callable[[], float]) -> None:
        """Stop accepting, wait for requests in flight, then close the idle connections (within ``remaining()``)."""
        with self._cond:
            self._accepting = False
            drained = self._cond.wait_for(lambda: self._in_flight == 0, remaining())
            idle_connections = list(self._connections)
        if not drained:
            logger.warning(
                "OTLP receiver stopped with %d HTTP requests still in flight", self._in_flight
            )
        # Idle keep-alive connections would otherwise sit in readline() until their timeout.
        for connection in idle_connections:
            with contextlib.suppress(OSError):  # the client closed it already
                connection.shutdown(socket.SHUT_RDWR)
        with self._cond:
            self._cond.wait_for(lambda: not self._connections, remaining())

    def connection_opened(self, connection: socket.socket) -> None:
        with self._cond:
            self._connections.add(connection)

    def connection_closed(self, connection: socket.socket) -> None:
        with self._cond:
            self._connections.discard(connection)
            self._cond.notify_all()

    def export_begins(self) -> bool:
        with self._cond:
            if not self._accepting:
                return False
            self._in_flight += 1
            return True

    def export_ends(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()


class _OtlpHttpHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive: the SDK's requests.Session reuses one connection per exporter.
    protocol_version = "HTTP/1.1"
    # Idle keep-alive connections are closed after this many seconds.
    timeout = 30
    server: OtlpHttpServer

    def setup(self) -> None:
        super().setup()
        self.server.connection_opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.connection_closed(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("OTLP/HTTP %s - " + format, self.address_string(), *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Only the stdlib calls this (bad request line, oversize headers); count those too.
        self.server.count_rejected("bad_http_request")
        super().send_error(code, message, explain)

    def do_POST(self) -> None:
        server = self.server
        if not server.export_begins():
            self._reject(HTTPStatus.SERVICE_UNAVAILABLE, "receiver_stopped", "the receiver is stopping")
            return
        try:
            self._handle_export(server)
        except Exception:
            logger.exception("OTLP/HTTP request handling failed")
            self._reject(HTTPStatus.INTERNAL_SERVER_ERROR, "internal_error", "the receiver failed")
        finally:
            server.export_ends()

    def _handle_export(self, server: OtlpHttpServer) -> None:
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
            server.count_rejected("truncated_body")
            self.close_connection = True
            return
        # From here the body has been read, so the connection can stay open whatever we answer.
        try:
            if encoding == "gzip":
                body = gunzip(body)
            parse = parse_json if content_type == _JSON_CONTENT_TYPE else parse_protobuf
            request = parse(body)
        except MalformedPayload as exc:
            self._reject(exc.status, exc.reason, exc.message, keep_alive=True)
            return
        try:
            rejected_spans, error_message = server.accept_spans(request)
        except Exception:
            # Already counted by accept_spans; the client must learn that these spans are gone.
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            self._send(status, *self._status_body(status, "the span sink failed"))
            return
        response = export_response(rejected_spans, error_message)
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
        self.server.count_rejected(reason)
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
