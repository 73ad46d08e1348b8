"""OpenTelemetry instrumentation for the official ``ollama`` Python client, sync and async.

It wraps ``Client._request`` and ``AsyncClient._request``: every public call (``generate``,
``chat``, the module-level ``ollama.generate`` …) goes through them, and they are where the
request's httpx ``extensions`` can carry a trace hook. The hook reports the moments the
client library hides: request bytes written (``http11.send_request_body.complete``), response
headers received (which Ollama sends together with the first token), and the local TCP port.

``instrument()`` and ``uninstrument()`` are idempotent. A failure inside the tracer is logged
and never reaches the host program; the host's own exceptions are re-raised unchanged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

from ollama_tracer.instrument.genai import StreamRecorder, operation_for_path, traced_stream
from ollama_tracer.instrument.httpx_client import async_hook, sync_hook
from opentelemetry import trace

log = logging.getLogger("tracer.instrument")

_ORIGINALS: dict[str, Any] = {}
def _start(
    tracer: trace.Tracer, client: Any, args: tuple[Any, ...], kwargs: dict[str, Any], record_content: bool,
) -> StreamRecorder | None:
    """A recorder for Ollama generation calls; None for everything else (list, pull, …).

    ``args`` are ``_request``'s positional arguments: (response class, method, path).
    """
    try:
        path = str(args[2]) if len(args) > 2 else ""
        if operation_for_path(path) is None:
            return None
        base = str(client._client.base_url).rstrip("/")
        recorder = StreamRecorder(
            tracer, url=base + path, body=kwargs.get("json"), stream=bool(kwargs.get("stream")),
            record_content=record_content,
        )
        return recorder
    except Exception:
        log.debug("tracer: could not start recording an ollama call", exc_info=True)
        return None


def _as_dict(part: Any) -> Mapping[str, Any]:
    if isinstance(part, Mapping):
        return part
    try:
        return dict(part)  # ollama's SubscriptableBaseModel iterates as (key, value) pairs
    except Exception:
        return {}


def _with_trace_hook(kwargs: dict[str, Any], hook: Callable[..., Any]) -> dict[str, Any]:
    """The call's kwargs with our httpx trace hook added to whatever extensions it had."""
    return {**kwargs, "extensions": {**kwargs.get("extensions", {}), "trace": hook}}


def _unary(result: Any, recorder: StreamRecorder) -> Any:
    """A non-streamed answer: headers, the one body and the end arrive together."""
    recorder.response_started()
    recorder.chunk(_as_dict(result))
    recorder.end()
    return result


def _wrap_sync(original: Callable[..., Any], tracer: trace.Tracer, record_content: bool) -> Callable[..., Any]:
    @functools.wraps(original)
    def _request(self: Any, *args: Any, **kwargs: Any) -> Any:
        recorder = _start(tracer, self, args, kwargs, record_content)
        if recorder is None:
            return original(self, *args, **kwargs)
        kwargs = _with_trace_hook(kwargs, sync_hook(recorder))
        try:
            result = original(self, *args, **kwargs)
        except BaseException as err:
            recorder.end(error=err)
            raise
        if not kwargs.get("stream"):
            return _unary(result, recorder)
        return _traced_stream(result, recorder)

    return _request


def _traced_stream(stream: Iterator[Any], recorder: StreamRecorder) -> Iterator[Any]:
    return traced_stream(stream, recorder, lambda part: recorder.chunk(_as_dict(part)))


def _wrap_async(original: Callable[..., Any], tracer: trace.Tracer, record_content: bool) -> Callable[..., Any]:
    @functools.wraps(original)
    async def _request(self: Any, *args: Any, **kwargs: Any) -> Any:
        recorder = _start(tracer, self, args, kwargs, record_content)
        if recorder is None:
            return await original(self, *args, **kwargs)
        kwargs = _with_trace_hook(kwargs, async_hook(recorder))
        try:
            result = await original(self, *args, **kwargs)
        except BaseException as err:
            recorder.end(error=err)
            raise
        if not kwargs.get("stream"):
            return _unary(result, recorder)
        return _traced_async_stream(result, recorder)

    return _request


async def _traced_async_stream(stream: AsyncIterator[Any], recorder: StreamRecorder) -> AsyncIterator[Any]:
    finished = False
    try:
        async for part in stream:
            recorder.chunk(_as_dict(part))
            yield part
        finished = True
    except GeneratorExit:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
        recorder.end(cancelled=True)
        raise
    except BaseException as err:
        recorder.end(error=err)
        raise
    finally:
        if finished:
            recorder.end()


class OllamaInstrumentor:
    """``OllamaInstrumentor().instrument()`` traces every ``ollama`` client in the process."""

    def instrument(self, tracer_provider: trace.TracerProvider | None = None, *,
                   record_content: bool = False) -> None:
        if _ORIGINALS:
            return
        try:
            # `ollama._client` the attribute is the default Client instance, not the module.
            from ollama._client import AsyncClient, Client
        except ImportError:
            log.debug("tracer: the ollama package is not installed; nothing to instrument")
            return
        tracer = trace.get_tracer("tracer.instrument.ollama", tracer_provider=tracer_provider)
        for cls, wrap in ((Client, _wrap_sync), (AsyncClient, _wrap_async)):
            key = f"{cls.__name__}._request"
            _ORIGINALS[key] = (cls, cls.__dict__["_request"])
            cls._request = wrap(cls.__dict__["_request"], tracer, record_content)  # type: ignore[method-assign]

    def uninstrument(self) -> None:
        for cls, original in _ORIGINALS.values():
            cls._request = original
        _ORIGINALS.clear()

    @property
    def is_instrumented(self) -> bool:
        return bool(_ORIGINALS)

