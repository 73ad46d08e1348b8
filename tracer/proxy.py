"""A streaming reverse proxy for the Ollama API that traces every request passing through it.

Clients in any language are traced by pointing ``OLLAMA_HOST`` at the proxy. Each request
becomes the same spans the Python instrumentation makes (``tracer.instrument.genai``), so the
capture pipeline attributes them unchanged: a stream the client closes early ends with
``tracer.cancelled=true``, and a new request from the same client within the interrupt window
makes an interrupt interval.

No buffering: every chunk is written to the client the moment it arrives from upstream; the
chunk is parsed for timing fields only after it was forwarded. The proxy's own cost is
measured per request (request in → upstream written; upstream chunk in → written to the
client) and shown as its own phases (``proxy.request``, ``proxy.first_token``).

Client disconnects are noticed at once (the handler is cancelled when the socket closes), so
an interrupt is timed when it happens, not at the next write. Memory is bounded: a request's
state lives only while it runs, latency samples are a fixed-size reservoir, and spans go to
the capture directory through the OTLP receiver as they end.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp import web
from ollama_tracer.instrument.genai import StreamRecorder, operation_for_path, stream_part, streams_by_default
from ollama_tracer.vocabulary import CLIENT_ADDRESS, PROCESS_PID, SERVICE_NAME, SERVICE_PROXY, TRACER_CLIENT_KEY
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger("tracer.proxy")

PROXY_SERVICE = SERVICE_PROXY
CLIENT_KEY_HEADER = "X-Tracer-Client"  # optional: tells concurrent clients on one address apart
# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the proxy recomputes.
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host", "content-length"}
RESERVOIR = 20_000  # latency samples kept per measure (uniform reservoir over the whole run)


class Reservoir:
    """A uniform sample of at most ``size`` values from an unbounded stream (Vitter's R)."""

    def __init__(self, size: int = RESERVOIR, seed: int = 7) -> None:
        self.size = size
        self.count = 0
        self.values = array.array("q")  # 8 bytes a value: the full reservoir is 160 KB, not megabytes
        self._random = random.Random(seed)

    def add(self, value: int) -> None:
        self.count += 1
        if len(self.values) < self.size:
            self.values.append(value)
            return
        slot = self._random.randrange(self.count)
        if slot < self.size:
            self.values[slot] = value

    def summary_us(self) -> dict[str, float | int | None]:
        if not self.values:
            return {"count": self.count, "median_us": None, "p99_us": None, "max_us": None}
        ordered = sorted(self.values)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        return {"count": self.count, "median_us": round(statistics.median(ordered) / 1000, 1),
                "p99_us": round(p99 / 1000, 1), "max_us": round(ordered[-1] / 1000, 1)}


@dataclass
class ProxyStats:
    requests: int = 0
    traced: int = 0
    cancelled: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    peak_in_flight: int = 0
    request_forward: Reservoir = field(default_factory=Reservoir)  # request in -> upstream written
    first_chunk_forward: Reservoir = field(default_factory=Reservoir)  # upstream first chunk -> client
    chunk_forward: Reservoir = field(default_factory=Reservoir)  # every chunk

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "traced": self.traced, "cancelled": self.cancelled,
                "failed": dict(self.failed), "failed_total": sum(self.failed.values()),
                "peak_in_flight": self.peak_in_flight,
                "added_latency": {"request_forward": self.request_forward.summary_us(),
                                  "first_chunk_forward": self.first_chunk_forward.summary_us(),
                                  "chunk_forward": self.chunk_forward.summary_us()}}


def _on_headers_sent(session: aiohttp.ClientSession, context: SimpleNamespace,
                     params: aiohttp.TraceRequestHeadersSentParams) -> Any:
    return _mark_written(context)


def _on_chunk_sent(session: aiohttp.ClientSession, context: SimpleNamespace,
                   params: aiohttp.TraceRequestChunkSentParams) -> Any:
    return _mark_written(context)


async def _mark_written(context: SimpleNamespace) -> None:
    holder = context.trace_request_ctx
    if isinstance(holder, dict):
        holder["written_ns"] = time.time_ns()  # the last write of the request wins


def _local_port(upstream: aiohttp.ClientResponse) -> int | None:
    """The proxy's end of the upstream connection. A short answer read whole with its headers has
    already given its connection back to the pool (``connection`` is None), but its protocol still
    holds the socket: without it a reused connection's request could be matched by time alone."""
    for holder in (upstream.connection, getattr(upstream, "_protocol", None)):
        transport = getattr(holder, "transport", None)
        with contextlib.suppress(Exception):
            sockname = transport.get_extra_info("sockname") if transport is not None else None
            if sockname:
                return int(sockname[1])
    return None


class OllamaProxy:
    """The proxy's request handling; :func:`serve` runs it on a socket until told to stop."""

    def __init__(self, upstream: str, *, tracer: trace.Tracer, record_content: bool = False,
                 upstream_timeout_s: float = 600.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.tracer = tracer
        self.record_content = record_content
        self.upstream_timeout_s = upstream_timeout_s
        self.stats = ProxyStats()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        trace_config = aiohttp.TraceConfig()
        trace_config.on_request_headers_sent.append(_on_headers_sent)
        trace_config.on_request_chunk_sent.append(_on_chunk_sent)
        self._session = aiohttp.ClientSession(
            trace_configs=[trace_config], auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.upstream_timeout_s),
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        received = time.time_ns()
        self.stats.requests += 1
        self.stats.in_flight += 1
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
        try:
            return await self._handle(request, received)
        finally:
            self.stats.in_flight -= 1

    async def _handle(self, request: web.Request, received: int) -> web.StreamResponse:
        assert self._session is not None
        try:
            body = await request.read()
        except (aiohttp.ClientError, asyncio.IncompleteReadError, ValueError):
            self.stats.failed["unreadable request body"] += 1
            return _error(400, "tracer proxy: the request body could not be read.")
        operation = operation_for_path(request.path)
        recorder = self._recorder(request, body, received) if operation else None
        holder: dict[str, int] = {}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        url = self.upstream + request.rel_url.raw_path_qs
        try:
            upstream = await self._session.request(request.method, url, data=body or None, headers=headers,
                                                   trace_request_ctx=holder, allow_redirects=False)
        except asyncio.CancelledError:
            # The client went away before the server's first byte (a client timeout shorter
            # than the time to first token): an interrupt like any other, not a lost request.
            self.stats.cancelled += 1
            if recorder is not None:
                recorder.end(cancelled=True)
                self.stats.traced += 1
            raise
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as err:
            reason = f"upstream {self.upstream} is unreachable ({type(err).__name__})"
            self.stats.failed[reason] += 1
            if recorder is not None:
                recorder.end(error=ConnectionError(reason))
            return _error(502, f"tracer proxy: {reason}.")
        headers_at = time.time_ns()
        written = holder.get("written_ns", headers_at)
        self.stats.request_forward.add(written - received)
        if recorder is not None:
            recorder.request_written(written)
            recorder.response_started(headers_at)
            port = _local_port(upstream)
            if port is not None:
                recorder.local_port = port  # the server sees this as the peer port
        return await self._relay(request, upstream, recorder)

    def _recorder(self, request: web.Request, body: bytes, received: int) -> StreamRecorder | None:
        try:
            parsed = json.loads(body) if body else {}
        except ValueError:
            return None  # not JSON: Ollama answers 400 itself; forwarded untraced
        if not isinstance(parsed, dict):
            return None
        recorder = StreamRecorder(self.tracer, url=self.upstream + request.path, body=parsed,
                                  stream=bool(parsed.get("stream", streams_by_default(request.path))),
                                  record_content=self.record_content,
                                  built_ns=received)
        if recorder.span is not None:
            peer = request.remote or "?"
            key = request.headers.get(CLIENT_KEY_HEADER) or \
                f"{peer}|{request.headers.get('User-Agent', '')}|{parsed.get('model', '')}"
            recorder.span.set_attribute(TRACER_CLIENT_KEY, key)
            recorder.span.set_attribute(CLIENT_ADDRESS, peer)
        return recorder

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse,
                     recorder: StreamRecorder | None) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            if key.lower() not in _HOP:
                response.headers[key] = value
        cancelled = False
        error: BaseException | None = None
        pending = b""
        first = True
        try:
            await response.prepare(request)
            async for data in upstream.content.iter_any():
                arrived = time.time_ns()
                await response.write(data)
                sent = time.time_ns()
                self.stats.chunk_forward.add(sent - arrived)
                if first:
                    self.stats.first_chunk_forward.add(sent - arrived)
                    first = False
                if recorder is not None:
                    pending = _feed(recorder, pending + data)
            if recorder is not None and pending.strip():  # a last line without its newline (a JSON answer)
                pending = _feed(recorder, pending + b"\n")
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError, aiohttp.ClientConnectionResetError):
            cancelled = True  # the client went away: an interrupt, not an error
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            error = err
            self.stats.failed[f"upstream stream broke ({type(err).__name__})"] += 1
        finally:
            upstream.close()  # closes the upstream connection too when cancelled: Ollama sees the interrupt
            # A client that closes once it has the last part (an OpenAI client after `data: [DONE]`)
            # may beat the chunked terminator: that is a finished stream, not an interrupt.
            interrupted = cancelled and not (recorder is not None and recorder.done)
            if recorder is not None:
                recorder.end(cancelled=interrupted, error=error)
                self.stats.traced += 1
            self.stats.cancelled += int(interrupted)
        if cancelled:
            raise asyncio.CancelledError
        return response


def _feed(recorder: StreamRecorder, buffer: bytes) -> bytes:
    """Hand every complete line (NDJSON, or SSE on the OpenAI-compatible endpoints) to the
    recorder as a part; return the incomplete rest (bounded)."""
    *lines, rest = buffer.split(b"\n")
    for line in lines:
        try:
            part = stream_part(line)
        except ValueError:
            continue
        if part is not None:
            recorder.chunk(part)
    return rest[-1_000_000:]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def check_listen(host: str, port: int) -> None:
    """Raise OSError with the standard errno if ``host:port`` cannot be bound (in use, not ours)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


class SegmentExporter(SpanExporter):
    """Sends the proxy's spans to the current segment's receiver; holds them between segments.

    The proxy runs for hours across rolling capture segments, each with its own receiver. At a
    segment's end the provider is flushed into it; spans that end while no segment is open (the
    collectors restarting) are held, up to ``hold`` of them, and go to the next one. Spans beyond
    that are counted as dropped, never silently lost."""

    def __init__(self, hold: int = 100_000) -> None:
        self.hold = hold
        self.dropped = 0
        self._target: SpanExporter | None = None
        self._held: list[ReadableSpan] = []
        self._lock = threading.Lock()

    def retarget(self, target: SpanExporter | None) -> None:
        with self._lock:
            old, self._target = self._target, target
            if target is not None and self._held:
                held, self._held = self._held, []
                if target.export(held) is not SpanExportResult.SUCCESS:
                    self.dropped += len(held)
        if old is not None:
            old.shutdown()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            if self._target is not None:
                result = self._target.export(spans)
                if result is not SpanExportResult.SUCCESS:
                    self.dropped += len(spans)
                return result
            room = self.hold - len(self._held)
            self._held.extend(spans[:max(room, 0)])
            self.dropped += max(len(spans) - max(room, 0), 0)
            return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.retarget(None)


class ProxyServer:
    """The proxy on its own thread and event loop, for the whole life of `tracer proxy`, while
    capture segments come and go around it."""

    def __init__(self, host: str, port: int, upstream: str, *, record_content: bool = False) -> None:
        from ollama_tracer.otel_setup import MAX_EXPORT_BATCH, MAX_QUEUE_SIZE
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.host, self.port, self.upstream = host, port, upstream
        self.exporter = SegmentExporter()
        self.provider = TracerProvider(resource=Resource.create({SERVICE_NAME: PROXY_SERVICE,
                                                                 PROCESS_PID: os.getpid()}))
        self.provider.add_span_processor(BatchSpanProcessor(self.exporter, max_queue_size=MAX_QUEUE_SIZE,
                                                            max_export_batch_size=MAX_EXPORT_BATCH))
        self.proxy = OllamaProxy(upstream, tracer=self.provider.get_tracer("tracer.proxy"),
                                 record_content=record_content)
        self.bound_port: int | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tracer-proxy", daemon=True)

    def start(self, timeout_s: float = 30.0) -> int:
        """Start serving; the bound port. Raises what binding raised (e.g. the port is taken)."""
        self._thread.start()
        if not self._ready.wait(timeout_s) and self.error is None:
            raise TimeoutError(f"the proxy did not start listening within {timeout_s:g} s")
        if self.error is not None:
            raise self.error
        assert self.bound_port is not None
        return self.bound_port

    def _run(self) -> None:
        def ready(port: int) -> None:
            self.bound_port = port
            self._ready.set()

        try:
            asyncio.run(serve(self.proxy, self.host, self.port, self._stopping.is_set, ready))
        except BaseException as err:  # reported by start() or stop()
            self.error = err
            self._ready.set()

    def flush(self) -> None:
        """Every span of a request that has ended is in the current target when this returns."""
        self.provider.force_flush()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.provider.shutdown()


async def serve(proxy: OllamaProxy, host: str, port: int, stop: Callable[[], bool],
                ready: Callable[[int], None] | None = None) -> None:
    """Serve until ``stop()`` is true (polled every 0.1 s); in-flight streams then end."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    # handler_cancellation: a client disconnect cancels its handler at once (interrupt timing).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await proxy.start()
    try:
        await site.start()
        bound = port
        sockets = getattr(site._server, "sockets", None)  # the port actually bound, for --listen HOST:0
        if sockets:
            bound = int(sockets[0].getsockname()[1])
        if ready is not None:
            ready(bound)
        while not stop():
            await asyncio.sleep(0.1)
    finally:
        await runner.cleanup()
        await proxy.close()
