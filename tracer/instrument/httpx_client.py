"""GenAI spans for generation calls made with ``httpx`` or ``httpx2`` directly: plain httpx
scripts, and the OpenAI Python SDK (httpx before 3.0, httpx2 since), on Ollama's own API and its
OpenAI-compatible one.

The HTTP span itself is the maintained ``opentelemetry-instrumentation-httpx``'s (it covers
both modules). It ends when the response does and knows nothing of GenAI, streams or first
chunks, so this module adds only what the attribution needs on top of it, and nothing else:

* a ``{operation} {model}`` GenAI span (the same shape as the ``ollama`` SDK's, through
  :class:`StreamRecorder`), made current around ``Client.send`` so the maintained HTTP span is
  its child;
* the request-written, headers-received and local-port moments, from httpcore's ``trace``
  extension (chained after one the caller set);
* the first chunk of the body, and whether the caller closed the stream before the server's
  last one (``tracer.cancelled``), from a wrapper around the response's byte stream. The first
  chunk is timed as its bytes leave the socket layer, before the caller's own decoding (the
  OpenAI SDK's SSE parser and pydantic models: well under a millisecond here).

Calls the ``ollama`` SDK makes are recorded by :mod:`ollama_client` at the SDK level and skipped
here (its trace hook carries a marker), so no request is recorded twice; the maintained HTTP span
is left out of those too (the GenAI span is the call's one span).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

from ollama_tracer.instrument.genai import (
    StreamRecorder,
    operation_for_path,
    stream_part,
    streams_by_default,
    whole_body_parts,
)
from opentelemetry import trace

try:  # opentelemetry-instrumentation, which the maintained httpx instrumentation brings
    from opentelemetry.instrumentation.utils import suppress_http_instrumentation
except ImportError:  # without it there is no maintained HTTP span to leave out
    suppress_http_instrumentation = contextlib.nullcontext  # type: ignore[assignment]

log = logging.getLogger("tracer.instrument")

MODULES = ("httpx", "httpx2")
OWNED = "_tracer_recorder"  # set on a trace hook whose call another instrumentor records
_HEADERS_STARTED = "http11.send_request_headers.started"
_SEND_DONE = "http11.send_request_body.complete"
_HEADERS_DONE = "http11.receive_response_headers.complete"
_CONNECTED = "connection.connect_tcp.complete"
_ORIGINALS: dict[str, tuple[Any, Any]] = {}


def _local_port(info: Mapping[str, Any]) -> int | None:
    try:
        sock = info["return_value"].get_extra_info("socket")
        return int(sock.getsockname()[1])
    except Exception:
        return None


def _pooled_local_port() -> int | None:
    """The local port of the connection httpcore is sending on, when it reused a pooled one (no
    connect event then). httpcore calls the trace hook from inside ``HTTP11Connection``'s methods,
    whose ``self`` holds the network stream; look a few frames up for it."""
    frame = sys._getframe(1)
    for _ in range(8):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            return None
        stream = getattr(frame.f_locals.get("self"), "_network_stream", None)
        if stream is not None:
            try:
                return int(stream.get_extra_info("socket").getsockname()[1])
            except Exception:
                return None
    return None


Hook = Callable[[str, dict[str, Any]], Any]


def sync_hook(recorder: StreamRecorder, then: Hook | None = None) -> Hook:
    """An httpcore ``trace`` extension that reports ``recorder``'s moments (then calls ``then``)."""
    def hook(event: str, info: dict[str, Any]) -> None:
        try:
            if event == _HEADERS_STARTED:
                if recorder.local_port is None:
                    recorder.local_port = _pooled_local_port()
            elif event == _SEND_DONE:
                recorder.request_written()
            elif event == _HEADERS_DONE:
                recorder.response_started()
            elif event == _CONNECTED:
                recorder.local_port = _local_port(info)
        except Exception:
            log.debug("tracer: trace hook failed", exc_info=True)
        if then is not None:
            then(event, info)

    setattr(hook, OWNED, recorder)
    return hook


def async_hook(recorder: StreamRecorder, then: Hook | None = None) -> Hook:
    sync = sync_hook(recorder)

    async def hook(event: str, info: dict[str, Any]) -> None:
        sync(event, info)
        if then is not None:
            await then(event, info)

    setattr(hook, OWNED, recorder)
    return hook


class _Parts:
    """Splits a body's bytes into lines and feeds each parsed part to the recorder."""

    def __init__(self, recorder: StreamRecorder) -> None:
        self.recorder, self._rest = recorder, b""

    def feed(self, data: bytes) -> None:
        try:
            *lines, self._rest = (self._rest + data).split(b"\n")
            for line in lines:
                part = stream_part(line)
                if part is not None:
                    self.recorder.chunk(part)
        except Exception:
            log.debug("tracer: unparsable stream bytes", exc_info=True)

    def end(self) -> None:
        if self._rest.strip():
            self.feed(b"\n")
        self.recorder.end(cancelled=not self.recorder.done)


class _SyncStream:
    """The response's byte stream, observed: the same bytes, in the same order."""

    def __init__(self, inner: Any, parts: _Parts) -> None:
        self._inner, self._parts = inner, parts

    def __iter__(self) -> Iterator[bytes]:
        for data in self._inner:
            self._parts.feed(data)
            yield data
        self._parts.end()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._parts.end()  # before the last part: the caller closed the stream early


class _AsyncStream:
    def __init__(self, inner: Any, parts: _Parts) -> None:
        self._inner, self._parts = inner, parts

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for data in self._inner:
            self._parts.feed(data)
            yield data
        self._parts.end()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._parts.end()


def _owned(request: Any) -> bool:
    """Is this a call another instrumentor records (the ``ollama`` SDK's: its trace hook carries
    the marker)? Then its GenAI span is that one's, and the maintained HTTP span under it is left
    out: one span per call is what the attribution needs, and each span more is export work in the
    traced program (benchmarks/peers.py)."""
    try:
        return getattr(request.extensions.get("trace"), OWNED, None) is not None
    except Exception:
        return False


def _start(tracer: trace.Tracer, request: Any, record_content: bool) -> StreamRecorder | None:
    """A recorder for a generation call nobody else records; None for everything else."""
    try:
        if request.method != "POST" or getattr(request.extensions.get("trace"), OWNED, None) is not None:
            return None
        path = request.url.path
        if operation_for_path(path) is None:
            return None
        body = json.loads(request.content) if request.content else {}
        if not isinstance(body, dict):
            return None
        return StreamRecorder(tracer, url=str(request.url), body=body,
                              stream=bool(body.get("stream", streams_by_default(path))), record_content=record_content)
    except Exception:
        log.debug("tracer: could not start recording an httpx call", exc_info=True)
        return None


def _observe(response: Any, recorder: StreamRecorder, *, streamed: bool, wrapper: Callable[..., Any]) -> None:
    try:
        recorder.response_started()
        if not streamed:  # httpx read the whole body before returning
            for part in whole_body_parts(response.content):
                recorder.chunk(part)
            recorder.end()
            return
        response.stream = wrapper(response.stream, _Parts(recorder))
    except Exception:
        log.debug("tracer: could not observe an httpx response", exc_info=True)


def _wrap_sync(original: Callable[..., Any], tracer: trace.Tracer, record_content: bool,
               stream: type) -> Callable[..., Any]:
    @functools.wraps(original)
    def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        if _owned(request):
            with suppress_http_instrumentation():
                return original(self, request, *args, **kwargs)
        recorder = _start(tracer, request, record_content)
        if recorder is None or recorder.span is None:
            return original(self, request, *args, **kwargs)
        request.extensions = {**request.extensions, "trace": sync_hook(recorder, request.extensions.get("trace"))}
        try:
            with trace.use_span(recorder.span, end_on_exit=False, record_exception=False,
                                set_status_on_exception=False):
                response = original(self, request, *args, **kwargs)
        except BaseException as err:
            recorder.end(error=err)
            raise
        _observe(response, recorder, streamed=bool(kwargs.get("stream")), wrapper=stream)
        return response

    return send


def _wrap_async(original: Callable[..., Any], tracer: trace.Tracer, record_content: bool,
               stream: type) -> Callable[..., Any]:
    @functools.wraps(original)
    async def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        if _owned(request):
            with suppress_http_instrumentation():
                return await original(self, request, *args, **kwargs)
        recorder = _start(tracer, request, record_content)
        if recorder is None or recorder.span is None:
            return await original(self, request, *args, **kwargs)
        request.extensions = {**request.extensions, "trace": async_hook(recorder, request.extensions.get("trace"))}
        try:
            with trace.use_span(recorder.span, end_on_exit=False, record_exception=False,
                                set_status_on_exception=False):
                response = await original(self, request, *args, **kwargs)
        except BaseException as err:
            recorder.end(error=err)
            raise
        _observe(response, recorder, streamed=bool(kwargs.get("stream")), wrapper=stream)
        return response

    return send


def _maintained(module_name: str, tracer_provider: trace.TracerProvider | None) -> None:
    """The maintained HTTP instrumentation of ``module_name``: its spans are the HTTP layer."""
    try:
        from opentelemetry.instrumentation import httpx as maintained

        instrumentor = {"httpx": maintained.HTTPXClientInstrumentor,
                        "httpx2": maintained.HTTPX2ClientInstrumentor}[module_name]()
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=tracer_provider)
    except Exception:
        log.debug("tracer: the maintained %s instrumentation did not start", module_name, exc_info=True)


class HttpxInstrumentor:
    """Traces generation calls made through ``httpx`` and ``httpx2`` clients, sync and async."""

    def instrument(self, tracer_provider: trace.TracerProvider | None = None, *,
                   record_content: bool = False) -> None:
        if _ORIGINALS:
            return
        tracer = trace.get_tracer("tracer.instrument.httpx", tracer_provider=tracer_provider)
        for name in MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            _maintained(name, tracer_provider)
            # httpx iterates only its own stream classes: the wrappers are those, per module.
            streams = (type("ObservedStream", (_SyncStream, module.SyncByteStream), {}),
                       type("ObservedAsyncStream", (_AsyncStream, module.AsyncByteStream), {}))
            for cls, wrap, stream in ((module.Client, _wrap_sync, streams[0]),
                                      (module.AsyncClient, _wrap_async, streams[1])):
                _ORIGINALS[f"{name}.{cls.__name__}"] = (cls, cls.__dict__["send"])
                cls.send = wrap(cls.__dict__["send"], tracer, record_content, stream)

    def uninstrument(self) -> None:
        for cls, original in _ORIGINALS.values():
            cls.send = original
        _ORIGINALS.clear()

    @property
    def is_instrumented(self) -> bool:
        return bool(_ORIGINALS)
