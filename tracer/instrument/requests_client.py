"""OpenTelemetry instrumentation of Ollama calls made with ``requests``, in the SDK's span shape.

``requests`` hides when the request bytes leave: urllib3's ``HTTPConnection.request`` returns
right after sending them, so a thin wrapper there notes the time (per thread) for the
``Session.send`` wrapper to pick up. ``Session.send`` returns once the response headers are in,
which Ollama sends together with the first token. Streamed bodies are observed through
``iter_lines``; closing the response before ``done`` marks the span cancelled.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ollama_tracer.instrument.genai import (
    StreamRecorder,
    operation_for_path,
    stream_part,
    streams_by_default,
    whole_body_parts,
)
from opentelemetry import trace

log = logging.getLogger("tracer.instrument")

_ORIGINALS: dict[str, tuple[Any, Any]] = {}
_sent = threading.local()


def _wrap_connection_request(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def request(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        _sent.written_ns = time.time_ns()
        try:
            _sent.local_port = int(self.sock.getsockname()[1])
        except Exception:
            _sent.local_port = None
        return result

    return request


def _wrap_send(original: Callable[..., Any], tracer: trace.Tracer, record_content: bool) -> Callable[..., Any]:
    @functools.wraps(original)
    def send(self: Any, request: Any, **kwargs: Any) -> Any:
        recorder = _recorder_for(tracer, request, kwargs, record_content)
        if recorder is None:
            return original(self, request, **kwargs)
        _sent.written_ns = None
        try:
            response = original(self, request, **kwargs)
        except BaseException as err:
            recorder.end(error=err)
            raise
        recorder.request_written(getattr(_sent, "written_ns", None))
        recorder.local_port = getattr(_sent, "local_port", None)
        recorder.response_started()
        try:
            _observe(response, recorder, streamed=bool(kwargs.get("stream")))
        except Exception:
            log.debug("tracer: could not observe a response", exc_info=True)
        return response

    return send


def _recorder_for(tracer: trace.Tracer, request: Any, kwargs: dict[str, Any],
                  record_content: bool) -> StreamRecorder | None:
    try:
        if request.method != "POST" or operation_for_path(request.path_url.split("?")[0]) is None:
            return None
        body = json.loads(request.body) if request.body else {}
        path = request.path_url.split("?")[0]
        return StreamRecorder(
            tracer, url=request.url, body=body, stream=bool(body.get("stream", streams_by_default(path))),
            record_content=record_content,
        )
    except Exception:
        log.debug("tracer: could not start recording a requests call", exc_info=True)
        return None


def _observe(response: Any, recorder: StreamRecorder, *, streamed: bool) -> None:
    if not streamed:
        for part in whole_body_parts(response.content):
            recorder.chunk(part)
        recorder.end()
        return
    original_iter_lines = response.iter_lines
    original_close = response.close

    def iter_lines(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for line in original_iter_lines(*args, **kwargs):
            if line:
                try:
                    part = stream_part(line)  # NDJSON, or an SSE line of the OpenAI-compatible API
                    if part is not None:
                        recorder.chunk(part)
                except Exception:
                    log.debug("tracer: unparsable stream line", exc_info=True)
            yield line
        recorder.end(cancelled=not recorder.done)

    def close() -> None:
        original_close()
        recorder.end(cancelled=not recorder.done)

    response.iter_lines = iter_lines
    response.close = close


class RequestsInstrumentor:
    """Traces Ollama generate/chat calls made through ``requests`` (any Session), on Ollama's own
    API and its OpenAI-compatible one (``/v1/chat/completions``, ``/v1/completions``)."""

    def instrument(self, tracer_provider: trace.TracerProvider | None = None, *,
                   record_content: bool = False) -> None:
        if _ORIGINALS:
            return
        import requests
        import urllib3.connection

        tracer = trace.get_tracer("tracer.instrument.requests", tracer_provider=tracer_provider)
        conn = urllib3.connection.HTTPConnection
        _ORIGINALS["conn"] = (conn, conn.__dict__["request"])
        conn.request = _wrap_connection_request(conn.__dict__["request"])  # type: ignore[method-assign]
        session = requests.Session
        _ORIGINALS["send"] = (session, session.__dict__["send"])
        session.send = _wrap_send(session.__dict__["send"], tracer, record_content)  # type: ignore[method-assign]

    def uninstrument(self) -> None:
        for key, (cls, original) in _ORIGINALS.items():
            setattr(cls, "request" if key == "conn" else "send", original)
        _ORIGINALS.clear()

    @property
    def is_instrumented(self) -> bool:
        return bool(_ORIGINALS)
