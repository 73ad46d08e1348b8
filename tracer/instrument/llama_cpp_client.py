"""OpenTelemetry instrumentation for llama-cpp-python (``llama_cpp.Llama``): llama.cpp in process.

It wraps ``Llama.create_completion`` (which ``Llama.__call__`` calls) and
``Llama.create_chat_completion``, streamed and not, and records each call as the GenAI span the
HTTP instrumentations record for a request: ``gen_ai.provider.name`` ``llama.cpp``, the prompt
handed to the library as the request written, the first chunk it yields as the first token, and
a stream the caller leaves early as cancelled (an interrupt). With ``tracer capture
--in-process`` the probes on the library then split each call (``tracer.attribution.ebpf_in_process``).

The package is never imported by us: importing it loads the native library, which the program
may want to point elsewhere first (``LLAMA_CPP_LIB_PATH``). The wrapping happens when the program
imports ``llama_cpp.llama`` itself (wrapt's post-import hook), or at once when it already has.
A call made inside another traced call (the chat handler calls ``create_completion``) is not
recorded twice. A failure inside the tracer is logged and never reaches the program; the
program's own exceptions are re-raised unchanged.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

import wrapt
from ollama_tracer.instrument.genai import StreamRecorder, openai_part, traced_stream
from ollama_tracer.vocabulary import GEN_AI_OPERATION_NAME
from opentelemetry import trace

log = logging.getLogger("tracer.instrument")

# The address a call's span carries: no server. Its path makes it llama.cpp's text completion.
IN_PROCESS_URL = "inprocess://llama-cpp-python/completion"
MODULE = "llama_cpp.llama"
_METHODS = {"create_completion": "text_completion", "create_chat_completion": "chat"}
_ORIGINALS: dict[str, Any] = {}
_INSIDE: ContextVar[bool] = ContextVar("tracer_llama_cpp_inside", default=False)
_STATE: dict[str, Any] = {}  # tracer, record_content: what the post-import hook wraps with


def _body(llm: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call as the recorder reads a request body: model, prompt or messages, max_tokens."""
    body: dict[str, Any] = {"model": str(kwargs.get("model") or getattr(llm, "model_path", "") or "")}
    first = args[0] if args else None
    if method == "create_chat_completion":
        body["messages"] = kwargs.get("messages", first)
    else:
        body["prompt"] = kwargs.get("prompt", first)
    max_tokens = kwargs.get("max_tokens", 16 if method == "create_completion" else None)
    if isinstance(max_tokens, int) and max_tokens > 0:
        body["max_tokens"] = max_tokens
    return body


def _start(tracer: trace.Tracer, llm: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
           record_content: bool) -> StreamRecorder | None:
    try:
        recorder = StreamRecorder(tracer, url=IN_PROCESS_URL, body=_body(llm, method, args, kwargs),
                                  stream=bool(kwargs.get("stream")), record_content=record_content)
        if recorder.span is not None and method == "create_chat_completion":
            recorder.span.set_attribute(GEN_AI_OPERATION_NAME, _METHODS[method])
        return recorder
    except Exception:
        log.debug("tracer: could not start recording a llama-cpp-python call", exc_info=True)
        return None


def _chunk(recorder: StreamRecorder, part: Any) -> None:
    try:
        recorder.response_started()
        recorder.chunk(openai_part(part) if isinstance(part, Mapping) else {})
    except Exception:
        log.debug("tracer: could not record a llama-cpp-python chunk", exc_info=True)


def _wrap(original: Callable[..., Any], method: str) -> Callable[..., Any]:
    @functools.wraps(original)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _INSIDE.get() or not _STATE:
            return original(self, *args, **kwargs)
        recorder = _start(_STATE["tracer"], self, method, args, kwargs, _STATE["record_content"])
        if recorder is None:
            return original(self, *args, **kwargs)
        token = _INSIDE.set(True)
        try:
            recorder.request_written()  # handed to the library: nothing is in flight before its first token
            result = original(self, *args, **kwargs)
        except BaseException as err:
            recorder.end(error=err)
            raise
        finally:
            _INSIDE.reset(token)
        if kwargs.get("stream") and not isinstance(result, Mapping):
            return traced_stream(result, recorder, functools.partial(_chunk, recorder))
        _chunk(recorder, result)  # the whole answer at once
        recorder.end()
        return result

    return call


def _patch(module: Any) -> None:
    """Wrap the module's ``Llama`` (the post-import hook; never raises)."""
    try:
        cls = module.Llama
        for method in _METHODS:
            if method in _ORIGINALS or method not in cls.__dict__:
                continue
            _ORIGINALS[method] = (cls, cls.__dict__[method])
            setattr(cls, method, _wrap(cls.__dict__[method], method))
    except Exception:
        log.debug("tracer: could not instrument llama_cpp.Llama", exc_info=True)


class LlamaCppInstrumentor:
    """``LlamaCppInstrumentor().instrument()`` traces every ``llama_cpp.Llama`` in the process."""

    def instrument(self, tracer_provider: trace.TracerProvider | None = None, *,
                   record_content: bool = False) -> None:
        if _STATE:
            return
        _STATE.update(tracer=trace.get_tracer("tracer.instrument.llama_cpp", tracer_provider=tracer_provider),
                      record_content=record_content)
        if MODULE in sys.modules:
            _patch(sys.modules[MODULE])
        else:
            wrapt.register_post_import_hook(_patch, MODULE)

    def uninstrument(self) -> None:
        for method, (cls, original) in _ORIGINALS.items():
            setattr(cls, method, original)
        _ORIGINALS.clear()
        _STATE.clear()  # a hook still registered then wraps nothing: the wrapper passes calls through

    @property
    def is_instrumented(self) -> bool:
        return bool(_ORIGINALS)
