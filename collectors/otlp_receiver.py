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

The parts: ``collectors.otlp_convert`` (OTLP requests to our span rows), ``collectors.otlp_http``
and ``collectors.otlp_grpc`` (the two servers); this module starts and stops both.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Final

from ollama_tracer.collectors import otlp_grpc
from ollama_tracer.collectors.otlp_convert import SpanDict, has_valid_ids, spans_from_request
from ollama_tracer.collectors.otlp_http import OtlpHttpServer
from ollama_tracer.errors import ExitCode, TracerError

logger = logging.getLogger(__name__)

SpanSink = Callable[[list[SpanDict]], None]

# Loopback only: the receiver accepts unauthenticated writes, so it must never face a network.
LOOPBACK_HOST: Final = "127.0.0.1"


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

        self._http_server: OtlpHttpServer | None = None
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
                http_server = OtlpHttpServer((LOOPBACK_HOST, 0), self._accept, self._count_rejected)
            except OSError as exc:
                raise TracerError(
                    f"Could not open the OTLP/HTTP receiver on {LOOPBACK_HOST} ({exc}); "
                    "check that the loopback interface is up.",
                    ExitCode.FAILURE,
                ) from exc
            executor = ThreadPoolExecutor(max_workers=self._grpc_workers, thread_name_prefix="otlp-grpc")
            grpc_server = otlp_grpc.new_server(executor, self._accept, self._count_rejected)
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
            http_server.start_accepting()
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
        self._http_server.drain(remaining)
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
        valid = [span for span in spans if has_valid_ids(span)]
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
