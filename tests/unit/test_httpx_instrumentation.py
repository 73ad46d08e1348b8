"""The httpx layer (plain httpx, httpx2 and so the OpenAI SDK) against a local HTTP server that
streams like Ollama: NDJSON on /api/generate, server-sent events on /v1/chat/completions. The
GenAI span is the parent of the maintained instrumentation's HTTP span; closing a stream early
marks it cancelled; the ollama SDK's own calls are recorded once, by the SDK layer."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from ollama_tracer.instrument.httpx_client import HttpxInstrumentor
from ollama_tracer.instrument.ollama_client import OllamaInstrumentor
from ollama_tracer.vocabulary import (
    GEN_AI_OPERATION_NAME,
    TRACER_CANCELLED,
    TRACER_FIRST_TOKEN_NS,
    TRACER_LOCAL_PORT,
    TRACER_REQUEST_WRITTEN_NS,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


class _Ollama(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        sse = self.path.startswith("/v1/")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream" if sse else "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        count = int(body.get("max_tokens") or (body.get("options") or {}).get("num_predict") or 50)
        try:
            for i in range(count):
                last = i == count - 1
                if sse:
                    choice = {"delta": {"content": "x"}, "finish_reason": "stop" if last else None}
                    line = "data: " + json.dumps({"model": body["model"], "choices": [choice]}) + "\n\n"
                else:
                    line = json.dumps({"model": body["model"], "response": "x", "done": last}) + "\n"
                self._chunk(line.encode())
                time.sleep(0.01)
            if sse:
                self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client closed early

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ollama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture()
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    HttpxInstrumentor().instrument(provider)
    OllamaInstrumentor().instrument(provider)
    try:
        yield exporter
    finally:
        HttpxInstrumentor().uninstrument()
        OllamaInstrumentor().uninstrument()
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
        HTTPXClientInstrumentor().uninstrument()


def _genai(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if (s.attributes or {}).get(GEN_AI_OPERATION_NAME)]


def test_a_stream_closed_early_is_cancelled_and_the_http_span_is_its_child(base_url: str,
                                                                            spans: InMemorySpanExporter) -> None:
    with httpx.Client(base_url=base_url) as client:
        with client.stream("POST", "/api/generate", json={"model": "m", "prompt": "p"}) as response:
            for _line in response.iter_lines():
                break
        with client.stream("POST", "/v1/chat/completions",
                           json={"model": "m", "stream": True, "max_tokens": 3, "messages": []}) as response:
            lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    cancelled, done = _genai(spans)
    assert cancelled.attributes[TRACER_CANCELLED] is True  # type: ignore[index]
    assert TRACER_CANCELLED not in (done.attributes or {}) and done.name == "chat m"
    for span in (cancelled, done):
        attributes = span.attributes or {}
        assert attributes[TRACER_LOCAL_PORT] and attributes[TRACER_REQUEST_WRITTEN_NS]
        assert span.start_time <= attributes[TRACER_FIRST_TOKEN_NS] <= span.end_time  # type: ignore[operator]
    http = [s for s in spans.get_finished_spans() if s.name == "POST"]
    assert len(http) == 2 and {s.parent.span_id for s in http if s.parent} == {  # the maintained HTTP spans
        cancelled.context.span_id, done.context.span_id}  # type: ignore[union-attr]


def test_async_and_a_whole_answer(base_url: str, spans: InMemorySpanExporter) -> None:
    import asyncio

    async def run() -> None:
        async with httpx.AsyncClient(base_url=base_url) as client:
            response = await client.post("/v1/chat/completions", json={"model": "m", "max_tokens": 2, "messages": []})
            assert response.text.count("data:") == 3  # the test server streams anyway: the body is all of it
            async with client.stream("POST", "/api/chat", json={"model": "m", "messages": []}) as streamed:
                async for _line in streamed.aiter_lines():
                    break

    asyncio.run(run())
    whole, cancelled = _genai(spans)
    assert TRACER_CANCELLED not in (whole.attributes or {}) and cancelled.attributes[TRACER_CANCELLED] is True  # type: ignore[index]


def test_the_ollama_sdk_is_recorded_once(base_url: str, spans: InMemorySpanExporter) -> None:
    import ollama

    for _part in ollama.Client(host=base_url).generate(model="m", prompt="p", stream=True,
                                                       options={"num_predict": 2}):
        pass
    (span,) = _genai(spans)
    assert span.instrumentation_scope.name == "tracer.instrument.ollama"  # type: ignore[union-attr]
    # ... as its one span: the maintained HTTP span under it is left out (less export work in the
    # traced program), while a plain httpx call keeps it (test_a_stream_closed_early...)
    assert not [s for s in spans.get_finished_spans() if s.name == "POST"]
    names = sorted(s.name for s in spans.get_finished_spans())
    assert names == ["client.first_token", "client.request", "text_completion m"], names
    with httpx.Client(base_url=base_url) as client:  # suppression stays inside the SDK's call
        client.post("/api/embed", json={"model": "m", "input": "x"})
    assert [s.name for s in spans.get_finished_spans() if s.name == "POST"] == ["POST"]


def test_other_requests_pass_untouched(base_url: str, spans: InMemorySpanExporter) -> None:
    with httpx.Client(base_url=base_url) as client:
        response = client.post("/api/embed", json={"model": "m", "input": "x"})
    assert response.status_code == 200 and not _genai(spans)


def test_a_capture_gets_one_span_per_call_and_rebuilds_the_moments(base_url: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `tracer capture` (TRACER_CLIENT_MOMENTS=attributes) the ollama SDK's call exports its
    GenAI span alone; reading the records back rebuilds client.request and client.first_token
    exactly as the default mode exports them (both through the real OTLP exporter and receiver)."""
    import ollama
    from ollama_tracer.collectors.otlp import with_client_moments
    from ollama_tracer.collectors.otlp_receiver import OtlpReceiver
    from ollama_tracer.instrument.moments import ENV_CLIENT_MOMENTS, MOMENTS_AS_ATTRIBUTES
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    def exported(moments: str | None) -> list[dict[str, Any]]:
        if moments is None:
            monkeypatch.delenv(ENV_CLIENT_MOMENTS, raising=False)
        else:
            monkeypatch.setenv(ENV_CLIENT_MOMENTS, moments)
        with OtlpReceiver() as receiver:
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.http_endpoint
                                                                             + "/v1/traces")))
            OllamaInstrumentor().instrument(provider)
            try:
                for _part in ollama.Client(host=base_url).generate(model="m", prompt="p", stream=True,
                                                                   options={"num_predict": 3}):
                    pass
            finally:
                OllamaInstrumentor().uninstrument()
                provider.shutdown()
            return receiver.spans()

    def children(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        (parent,) = [r for r in rows if GEN_AI_OPERATION_NAME in r["attributes"]]
        gap = int(parent["startTimeUnixNano"])
        return sorted((r["name"], r["kind"], int(r["startTimeUnixNano"]) - gap, int(r["endTimeUnixNano"]) - gap,
                       r["attributes"], r["parentSpanId"] == parent["spanId"], r["service"])
                      for r in rows if r["parentSpanId"] == parent["spanId"])

    default, one_span = exported(None), exported(MOMENTS_AS_ATTRIBUTES)
    assert [r["name"] for r in one_span] == ["text_completion m"]
    assert {r["name"] for r in default} == {"text_completion m", "client.request", "client.first_token"}
    # the same shape, and the same moments relative to the call's start (two calls: times differ)
    rebuilt = children(with_client_moments(one_span))
    assert [c[:2] + c[4:] for c in rebuilt] == [c[:2] + c[4:] for c in children(default)]
    parent = one_span[0]["attributes"]
    start = int(one_span[0]["startTimeUnixNano"])
    assert rebuilt[1][2:4] == (0, int(parent[TRACER_REQUEST_WRITTEN_NS]) - start)  # client.request
    assert rebuilt[0][3] == int(parent[TRACER_FIRST_TOKEN_NS]) - start  # client.first_token ends at the token
    assert with_client_moments(with_client_moments(one_span)) == with_client_moments(one_span)  # never doubled
    assert len(with_client_moments(default)) == len(default)
