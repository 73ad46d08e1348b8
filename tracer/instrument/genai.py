"""One streamed Ollama request as OpenTelemetry spans, fed by whichever HTTP client made it.

Both instrumentors (the ``ollama`` SDK over httpx, and ``requests``) report the same moments
to a :class:`StreamRecorder`, so every client produces the same span shape:

* ``{operation} {model}`` (CLIENT): request built → stream finished or closed early. A stream
  the caller closes early ends with ``tracer.cancelled=true`` and status *unset*: an interrupt
  is not an error.
* ``client.request``: request built → its bytes written to the socket.
* ``client.first_token``: response bytes at the client → first token handed to the caller.

Attributes follow the OpenTelemetry GenAI semantic conventions. Ollama's own timing fields
and the server-side ``created_at`` of the first and last chunks are kept as ``ollama.*``
attributes, so the server's phases can be rebuilt from the span alone (``source=response``).
Prompt and completion text is recorded only with ``record_content=True``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

from ollama_tracer.clock import parse_created_at
from ollama_tracer.instrument.moments import ENV_CLIENT_MOMENTS, MOMENTS_AS_ATTRIBUTES
from ollama_tracer.vocabulary import (
    CLIENT_FIRST_TOKEN,
    CLIENT_REQUEST,
    ENV_GENAI_PROVIDER,
    ERROR_TYPE,
    GEN_AI_INPUT_MESSAGES,
    GEN_AI_OPERATION_NAME,
    GEN_AI_OUTPUT_MESSAGES,
    GEN_AI_PROVIDER_NAME,
    GEN_AI_REQUEST_MAX_TOKENS,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_REQUEST_STREAM,
    GEN_AI_RESPONSE_FINISH_REASONS,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    GENAI_PROVIDERS,
    GENERATION_ENDPOINTS,
    LLAMA_SERVER_COMPLETION,
    OLLAMA_CREATED_AT_FIRST_NS,
    OLLAMA_CREATED_AT_LAST_NS,
    OLLAMA_TIMING_ATTRIBUTES,
    PROVIDER_LLAMA_CPP,
    PROVIDER_OLLAMA,
    SERVER_ADDRESS,
    SERVER_PORT,
    SOURCE_CLIENT,
    THREAD_ID,
    TRACER_CANCELLED,
    TRACER_CHUNKS,
    TRACER_FIRST_TOKEN_NS,
    TRACER_LOCAL_PORT,
    TRACER_REQUEST_WRITTEN_NS,
    TRACER_RESPONSE_START_NS,
    TRACER_SOURCE,
)
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

log = logging.getLogger("tracer.instrument")

# Ollama's own API streams NDJSON by default; its OpenAI-compatible one streams server-sent
# events (``data: {...}``, ending ``data: [DONE]``) and only when asked to (``"stream": true``).
OPERATIONS = GENERATION_ENDPOINTS
OPENAI_PREFIX = "/v1/"
SSE_DONE = "[DONE]"
TIMING_FIELDS = (
    "total_duration", "load_duration", "prompt_eval_duration", "eval_duration",
    "prompt_eval_count", "eval_count", "prompt_eval_cached_count",
)


# The recorder of the latest call made in this context: lets a caller that made the call (the
# benchmark) read the moments the HTTP client hid from it, without another hook.
LAST_RECORDER: ContextVar[StreamRecorder | None] = ContextVar("tracer_last_recorder", default=None)


def operation_for_path(path: str) -> str | None:
    for suffix, operation in OPERATIONS.items():
        if path.split("?")[0].rstrip("/").endswith(suffix):
            return operation
    return None


def provider_for_path(path: str) -> str:
    """gen_ai.provider.name of a call to ``path``: llama-server's own ``/completion`` is llama.cpp's,
    Ollama's API is Ollama's, and the OpenAI-compatible one, which both serve, is Ollama's unless
    ``TRACER_GENAI_PROVIDER`` names another known provider."""
    if is_openai_path(path):
        named = os.environ.get(ENV_GENAI_PROVIDER, "")
        return named if named in GENAI_PROVIDERS else PROVIDER_OLLAMA
    if path.split("?")[0].rstrip("/").endswith(LLAMA_SERVER_COMPLETION):
        return PROVIDER_LLAMA_CPP
    return PROVIDER_OLLAMA


def is_openai_path(path: str) -> bool:
    return OPENAI_PREFIX in path and operation_for_path(path) is not None


def streams_by_default(path: str) -> bool:
    """Whether a body without ``"stream"`` is answered as a stream: Ollama's API yes, OpenAI's and
    llama-server's own ``/completion`` no."""
    return not is_openai_path(path) and not path.split("?")[0].rstrip("/").endswith(LLAMA_SERVER_COMPLETION)


def stream_part(line: bytes | str) -> dict[str, Any] | None:
    """One line of a streamed answer as an object: an NDJSON line, or an SSE ``data:`` line (the
    OpenAI-compatible endpoints). ``data: [DONE]`` is ``{"done": True}``; blank lines, SSE comments
    and other fields are None. Raises ValueError on a line that is neither."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    text = text.strip()
    if not text or text.startswith(":") or text.startswith(("event:", "id:", "retry:")):
        return None
    if text.startswith("data:"):
        payload = text[5:].strip()
        if payload == SSE_DONE:
            return {"done": True}
        part = json.loads(payload)
        return openai_part(part) if isinstance(part, dict) else None
    part = json.loads(text)
    return part if isinstance(part, dict) else None


def whole_body_parts(content: bytes) -> list[dict[str, Any]]:
    """A body read at once: one JSON answer (a non-streamed call), or a whole stream's lines."""
    try:
        whole = json.loads(content)
    except ValueError:
        return [part for part in map(stream_part, content.splitlines()) if part is not None]
    return [openai_part(whole)] if isinstance(whole, dict) else []


def openai_part(part: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped chunk or answer in the fields the recorder reads (Ollama's names): its text
    as ``response``, ``done`` once a choice has a finish reason, the usage as token counts."""
    if "choices" not in part:
        return llama_server_part(part) if "content" in part and "stop" in part else dict(part)
    out: dict[str, Any] = {"model": part.get("model")} if part.get("model") else {}
    texts, reasons = [], []
    for choice in part.get("choices") or []:
        if not isinstance(choice, Mapping):
            continue
        delta = choice.get("delta") or choice.get("message") or {}
        text = choice.get("text") if "text" in choice else (delta.get("content") if isinstance(delta, Mapping)
                                                           else None)
        if text:
            texts.append(str(text))
        if choice.get("finish_reason"):
            reasons.append(str(choice["finish_reason"]))
    if texts:
        out["response"] = "".join(texts)
    if reasons:
        out["done"], out["done_reason"] = True, reasons[0]
    usage = part.get("usage")
    if isinstance(usage, Mapping):
        for ours, theirs in (("prompt_eval_count", "prompt_tokens"), ("eval_count", "completion_tokens")):
            if isinstance(usage.get(theirs), int):
                out[ours] = usage[theirs]
    out["openai"] = True
    return out


def llama_server_part(part: Mapping[str, Any]) -> dict[str, Any]:
    """A chunk or answer of llama-server's own ``/completion`` in the recorder's fields: its
    ``content`` as ``response``, ``stop`` as ``done``, its counts and its own prefill and decode
    times (``timings``, ms) as Ollama's duration fields (ns)."""
    out: dict[str, Any] = {"response": str(part["content"])} if part.get("content") else {}
    if part.get("stop"):
        out["done"] = True
        timings = part.get("timings") if isinstance(part.get("timings"), Mapping) else {}
        assert isinstance(timings, Mapping)
        for ours, theirs in (("prompt_eval_count", "tokens_evaluated"), ("eval_count", "tokens_predicted")):
            if isinstance(part.get(theirs), int):
                out[ours] = part[theirs]
        for ours, theirs in (("prompt_eval_duration", "prompt_ms"), ("eval_duration", "predicted_ms")):
            if isinstance(timings.get(theirs), int | float):
                out[ours] = int(timings[theirs] * 1e6)
    if part.get("model"):
        out["model"] = part["model"]
    return out


class StreamRecorder:
    """Records one request's moments; every method swallows its own failures.

    A tracer failure must never break the traced program, so each hook logs and carries on.
    """

    def __init__(
        self,
        tracer: trace.Tracer,
        *,
        url: str,
        body: Mapping[str, Any] | None,
        stream: bool,
        record_content: bool = False,
        built_ns: int | None = None,
    ) -> None:
        self.built_ns = built_ns or time.time_ns()
        self.written_ns: int | None = None
        self.response_start_ns: int | None = None
        self.first_token_ns: int | None = None
        self.first_chunk_created_ns: int | None = None
        self.last_chunk_created_ns: int | None = None
        self.final: dict[str, Any] = {}
        self.chunks = 0
        self.local_port: int | None = None
        self._record_content = record_content
        self._completion: list[str] = []
        self._ended = False
        self.done = False  # the server's last part arrived: a close after it is not an interrupt
        self.span: Span | None = None
        self._child_spans = os.environ.get(ENV_CLIENT_MOMENTS) != MOMENTS_AS_ATTRIBUTES
        LAST_RECORDER.set(self)
        try:
            parts = urlsplit(url)
            body = body or {}
            self.operation = operation_for_path(parts.path) or "text_completion"
            self.model = str(body.get("model", ""))
            options = body.get("options") or {}
            attributes: dict[str, Any] = {
                GEN_AI_PROVIDER_NAME: provider_for_path(parts.path),
                GEN_AI_OPERATION_NAME: self.operation,
                GEN_AI_REQUEST_MODEL: self.model,
                GEN_AI_REQUEST_STREAM: stream,
                SERVER_ADDRESS: parts.hostname or "",
                SERVER_PORT: parts.port or (443 if parts.scheme == "https" else 80),
                # The pthread id py-spy reports: the client's stacks in a phase are this thread's.
                THREAD_ID: threading.get_ident(),
            }
            if isinstance(options, Mapping) and options.get("num_predict") is not None:
                attributes[GEN_AI_REQUEST_MAX_TOKENS] = int(options["num_predict"])
            elif body.get("max_tokens") is not None:  # the OpenAI-compatible endpoints' name for it
                attributes[GEN_AI_REQUEST_MAX_TOKENS] = int(body["max_tokens"])
            if record_content:
                messages = body.get("messages")
                if messages is None:
                    messages = [{"role": "user", "content": body.get("prompt", "")}]
                attributes[GEN_AI_INPUT_MESSAGES] = json.dumps(messages)
            self.span = tracer.start_span(
                f"{self.operation} {self.model}".strip(), kind=SpanKind.CLIENT,
                start_time=self.built_ns, attributes=attributes,
            )
            self._tracer = tracer
        except Exception:  # never break the host program
            log.debug("tracer: could not start a span", exc_info=True)

    # -- moments reported by the HTTP client ------------------------------------------------
    def request_written(self, when_ns: int | None = None) -> None:
        self.written_ns = when_ns or time.time_ns()

    def response_started(self, when_ns: int | None = None) -> None:
        if self.response_start_ns is None:
            self.response_start_ns = when_ns or time.time_ns()

    def chunk(self, part: Mapping[str, Any]) -> None:
        """Called with each parsed part (an NDJSON object, or an SSE event through
        :func:`stream_part`), just before it is handed to the caller."""
        try:
            now = time.time_ns()
            self.chunks += 1
            self.done = self.done or bool(part.get("done"))  # first: whatever fails below, this holds
            created = part.get("created_at")
            if isinstance(created, str) and created:
                created_ns = parse_created_at(created)
                if self.first_chunk_created_ns is None:
                    self.first_chunk_created_ns = created_ns
                self.last_chunk_created_ns = created_ns
            if self.first_token_ns is None:
                self.first_token_ns = now
            if self._record_content:
                text = part.get("response")
                if text is None and isinstance(part.get("message"), Mapping):
                    text = part["message"].get("content")
                if text:
                    self._completion.append(str(text))
            if part.get("done"):
                # An OpenAI stream says it is done twice (a finish reason, then [DONE]): keep both's fields.
                fields = (*TIMING_FIELDS, "done_reason", "model")
                self.final.update({k: part[k] for k in fields if part.get(k) is not None})
        except Exception:
            log.debug("tracer: could not record a chunk", exc_info=True)

    def end(self, *, cancelled: bool = False, error: BaseException | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        try:
            self._finish(cancelled=cancelled, error=error)
        except Exception:
            log.debug("tracer: could not end a span", exc_info=True)

    # -- span assembly ---------------------------------------------------------------------
    def _finish(self, *, cancelled: bool, error: BaseException | None) -> None:
        span = self.span
        if span is None:
            return
        end_ns = time.time_ns()
        ctx = trace.set_span_in_context(span)
        if self.written_ns is not None and self._child_spans:
            child = self._tracer.start_span(CLIENT_REQUEST, context=ctx, start_time=self.built_ns)
            child.set_attribute(TRACER_SOURCE, SOURCE_CLIENT)
            child.end(end_time=self.written_ns)
        if self.first_token_ns is not None:
            if self._child_spans:
                bytes_at_client = self.response_start_ns or self.first_token_ns
                child = self._tracer.start_span(CLIENT_FIRST_TOKEN, context=ctx, start_time=bytes_at_client)
                child.set_attribute(TRACER_SOURCE, SOURCE_CLIENT)
                child.end(end_time=self.first_token_ns)
            span.set_attribute(GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, (self.first_token_ns - self.built_ns) / 1e9)
        attributes: dict[str, Any] = {TRACER_CHUNKS: self.chunks}
        for name, value in (
            (TRACER_REQUEST_WRITTEN_NS, self.written_ns),
            (TRACER_RESPONSE_START_NS, self.response_start_ns),
            (TRACER_FIRST_TOKEN_NS, self.first_token_ns),
            (OLLAMA_CREATED_AT_FIRST_NS, self.first_chunk_created_ns),
            (OLLAMA_CREATED_AT_LAST_NS, self.last_chunk_created_ns),
            (TRACER_LOCAL_PORT, self.local_port),
        ):
            if value is not None:
                attributes[name] = value
        for key in TIMING_FIELDS:
            if key in self.final:
                attributes[OLLAMA_TIMING_ATTRIBUTES[key]] = int(self.final[key])
        if "prompt_eval_count" in self.final:
            attributes[GEN_AI_USAGE_INPUT_TOKENS] = int(self.final["prompt_eval_count"])
        if "eval_count" in self.final:
            attributes[GEN_AI_USAGE_OUTPUT_TOKENS] = int(self.final["eval_count"])
        if "done_reason" in self.final:
            attributes[GEN_AI_RESPONSE_FINISH_REASONS] = [str(self.final["done_reason"])]
        if "model" in self.final:
            attributes[GEN_AI_RESPONSE_MODEL] = str(self.final["model"])
        if self._record_content and self._completion:
            attributes[GEN_AI_OUTPUT_MESSAGES] = json.dumps(
                [{"role": "assistant", "content": "".join(self._completion)}]
            )
        if cancelled:
            attributes[TRACER_CANCELLED] = True
        span.set_attributes(attributes)
        if error is not None:
            span.record_exception(error)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)[:200]))
            span.set_attribute(ERROR_TYPE, type(error).__qualname__)
        span.end(end_time=end_ns)


def traced_stream(stream: Iterator[Any], recorder: StreamRecorder,
                  on_part: Callable[[Any], None]) -> Iterator[Any]:
    """``stream``'s parts, each reported (``on_part``) just before it is handed on; the call's span
    ends with the stream: done, cancelled (the caller closed it early: an interrupt, not an error;
    the stream under it is closed at once, which closes an HTTP response's connection), or failed
    (the error re-raised unchanged)."""
    finished = False
    try:
        for part in stream:
            on_part(part)
            yield part
        finished = True
    except GeneratorExit:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        recorder.end(cancelled=True)
        raise
    except BaseException as err:
        recorder.end(error=err)
        raise
    finally:
        if finished:
            recorder.end()

