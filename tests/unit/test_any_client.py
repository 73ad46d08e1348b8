"""Any client, any endpoint, on synthetic input: the OpenAI-compatible stream format, the
server-side requests merged with the client's (none counted twice), and the requests the
server read that no interval follows."""

from __future__ import annotations

import json
from typing import Any

import pytest
from ollama_tracer.attribution.server_requests import (
    merge_server_requests,
    server_request_spans,
    untracked_requests,
)
from ollama_tracer.collectors.ebpf_events import ProbeEvent, join_split_reads
from ollama_tracer.instrument.genai import (
    operation_for_path,
    provider_for_path,
    stream_part,
    streams_by_default,
    whole_body_parts,
)
from ollama_tracer.vocabulary import (
    CLIENT_PORT,
    ENV_GENAI_PROVIDER,
    GEN_AI_PROVIDER_NAME,
    SEEN_FROM_SERVER,
    TRACER_CANCELLED,
    TRACER_FIRST_TOKEN_NS,
    TRACER_LOCAL_PORT,
    TRACER_SEEN_FROM,
)

SERVER = 100
ROLES = {SERVER: "server"}
MS = 1_000_000


def _chunk(content: str, finish: str | None = None) -> str:
    return "data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": finish}]})


def test_sse_lines_are_parts_and_done_is_done() -> None:
    assert stream_part(_chunk("Hi")) == {"model": "m", "response": "Hi", "openai": True}
    assert stream_part(_chunk("", "stop"))["done"] is True  # type: ignore[index]
    assert stream_part(b"data: [DONE]") == {"done": True}
    assert stream_part(b"") is None and stream_part(": keep-alive") is None and stream_part("event: x") is None
    assert stream_part(b'{"response": "a", "done": false}') == {"response": "a", "done": False}  # NDJSON
    with pytest.raises(ValueError):
        stream_part("not json")


def test_completions_text_usage_and_a_whole_answer() -> None:
    answer = {"object": "text_completion", "model": "m", "choices": [{"text": "ok", "finish_reason": "length"}],
              "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
    (part,) = whole_body_parts(json.dumps(answer, indent=2).encode())  # pretty-printed: one JSON, not lines
    assert part["response"] == "ok" and part["done"] and part["prompt_eval_count"] == 7 and part["eval_count"] == 2
    ndjson = b'{"response":"a","done":false}\n{"response":"","done":true,"eval_count":3}\n'
    assert [p["done"] for p in whole_body_parts(ndjson)] == [False, True]


@pytest.mark.parametrize(("path", "operation", "streams"), [
    ("/api/generate", "text_completion", True), ("/api/chat", "chat", True),
    ("/v1/chat/completions", "chat", False), ("/v1/completions", "text_completion", False),
    ("/v1/chat/completions?x=1", "chat", False), ("/api/embed", None, True),
    ("/completion", "text_completion", False), ("/completions", None, True),
])
def test_endpoints(path: str, operation: str | None, streams: bool) -> None:
    assert operation_for_path(path) == operation
    if operation:
        assert streams_by_default(path) is streams


def test_the_provider_is_the_engine_the_path_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama-server's own /completion is llama.cpp's, Ollama's API Ollama's; the OpenAI-compatible
    path, which both serve, is Ollama's unless TRACER_GENAI_PROVIDER names a known provider."""
    monkeypatch.delenv(ENV_GENAI_PROVIDER, raising=False)
    assert [provider_for_path(p) for p in ("/completion", "/api/generate", "/v1/chat/completions")] == [
        "llama.cpp", "ollama", "ollama"]
    monkeypatch.setenv(ENV_GENAI_PROVIDER, "llama.cpp")
    assert [provider_for_path(p) for p in ("/v1/completions", "/api/chat", "/completion")] == [
        "llama.cpp", "ollama", "llama.cpp"]
    monkeypatch.setenv(ENV_GENAI_PROVIDER, "vllm")  # not one the finder knows: the default stands
    assert provider_for_path("/v1/chat/completions") == "ollama"


def test_a_llama_cpp_call_is_an_interval_s_call_as_an_ollama_one_is() -> None:
    clients = [{**_client(0, 60, 5001), "attributes": {GEN_AI_PROVIDER_NAME: "llama.cpp", TRACER_LOCAL_PORT: 5001}},
               {**_client(100, 160, 5002), "attributes": {GEN_AI_PROVIDER_NAME: "other", TRACER_LOCAL_PORT: 5002}}]
    added, counts = merge_server_requests(clients, [_server(1, 5001), _server(101, 5002)])
    assert counts["matched_by_port"] == 1 and [s["spanId"] for s in added] == ["s101"]
    spans = server_request_spans(_session(10, 5001, 0), ROLES, provider="llama.cpp")
    assert [s["attributes"][GEN_AI_PROVIDER_NAME] for s in spans] == ["llama.cpp"]


def E(kind: str, t: float, fd: int = -1, value: int = 0, text: str = "") -> ProbeEvent:
    return ProbeEvent(kind, int(t * MS), SERVER, SERVER, fd=fd, value=value, text=text)


def _session(fd: int, port: int, at: float, path: str = "POST /v1/chat/comp", cancel: bool = False) -> list[ProbeEvent]:
    """One client connection: accept, request, first response bytes, then EOF (cancelled) or done."""
    end = [E("R", at + 50, fd, 0)] if cancel else [E("W", at + 50, fd, 5, "0\r\n\r\n")]
    return [E("A", at, fd, port), E("R", at + 1, fd, 200, path), E("W", at + 20, fd, 300, "HTTP/1.1 200 OK\r\n"),
            *end, E("X", at + 60, fd)]


def test_the_server_finder_follows_the_openai_endpoints() -> None:
    events = [*_session(10, 5001, 0, cancel=True), *_session(11, 5002, 100, "POST /v1/completio"),
              *_session(12, 5003, 200, "POST /api/embed HT")]
    spans = server_request_spans(events, ROLES)
    assert [s["attributes"][CLIENT_PORT] for s in spans] == [5001, 5002]
    assert spans[0]["attributes"][TRACER_CANCELLED] and TRACER_CANCELLED not in spans[1]["attributes"]
    assert spans[1]["attributes"][TRACER_FIRST_TOKEN_NS] == 120 * MS
    assert untracked_requests(events, ROLES, spans) == [
        {"endpoint": "POST /api/embed", "reason": "not a generation endpoint (not followed)", "count": 1}]


def test_a_request_whose_first_byte_the_background_read_took_is_one_request() -> None:
    """Go's server reads one byte in the background while a handler runs; a keep-alive client's
    next request arriving then is read as "P", and "OST /api/..." once the previous response is
    finished (measured: 5-18 s later behind a 300-token stream). It is one request, from its first
    byte; a 1-byte read that nothing followed stays one byte."""
    split = [E("A", 0, 8, 5001), E("R", 1, 8, 180, "POST /api/generate"), E("W", 2, 8, 200, "HTTP/1.1 200 OK\r\n"),
             E("R", 3, 8, 1, "P\\x00\\x00\\x00C\\xc4"), E("W", 4, 8, 5, "0\r\n\r\n"),
             E("R", 9, 8, 179, "OST /api/generate "), E("R", 10, 9, 1, "G\\x00"), E("X", 11, 9)]
    joined = join_split_reads(split)
    assert [(e.kind, e.time_ns // MS, e.value, e.text) for e in joined if e.kind == "R"] == [
        ("R", 1, 180, "POST /api/generate"), ("R", 3, 180, "POST /api/generate"), ("R", 10, 1, "G\\x00")]
    assert [e.time_ns for e in joined] == sorted(e.time_ns for e in joined)
    assert len(server_request_spans(joined, ROLES)) == 2


def test_an_accept_ends_a_runner_hop_whose_close_was_not_seen() -> None:
    """A connection to a runner on fd 10 whose close the capture missed (it began before the
    probes, or its close came after they stopped): a client accepted on fd 10 is a client's."""
    hop = [E("C", 0, 10, -115), E("W", 1, 10, 200, "POST /completion H")]
    spans = server_request_spans([*hop, *_session(10, 5001, 100)], ROLES)
    assert [s["attributes"][CLIENT_PORT] for s in spans] == [5001]


def _client(start: float, end: float, port: int | None) -> dict[str, Any]:
    attributes: dict[str, Any] = {GEN_AI_PROVIDER_NAME: "ollama"}
    if port:
        attributes[TRACER_LOCAL_PORT] = port
    return {"spanId": f"c{start}", "startTimeUnixNano": int(start * MS), "endTimeUnixNano": int(end * MS),
            "attributes": attributes}


def _server(start: float, port: int) -> dict[str, Any]:
    return {"spanId": f"s{start}", "startTimeUnixNano": int(start * MS), "endTimeUnixNano": int((start + 50) * MS),
            "attributes": {CLIENT_PORT: port}}


def test_a_request_with_client_spans_is_not_added_again_and_one_without_is() -> None:
    clients = [_client(0, 60, 5001), _client(99, 160, None), _client(300, 360, 7000)]  # 7000: behind a relay
    servers = [_server(1, 5001), _server(101, 5002), _server(201, 5003), _server(301, 6000)]
    added, counts = merge_server_requests(clients, servers)
    assert counts == {"matched_by_port": 1, "matched_by_time": 2, "server_only": 1}
    assert [s["spanId"] for s in added] == ["s201"] and added[0]["attributes"][TRACER_SEEN_FROM] == SEEN_FROM_SERVER


def test_a_client_whose_port_the_server_saw_is_never_taken_by_time() -> None:
    """An uninstrumented request inside an instrumented one's time (two clients at once) stays the
    server's: the instrumented span's port names its own request."""
    clients = [_client(0, 100, 5001)]
    servers = [_server(10, 5002), _server(20, 5001)]
    added, counts = merge_server_requests(clients, servers)
    assert [s["spanId"] for s in added] == ["s10"] and counts["matched_by_port"] == 1


def test_llama_server_native_chunks_are_parts_with_its_own_timings() -> None:
    """llama-server's own /completion (llama.cpp run alone): {"content", "stop"} events, the last
    with its counts and its own prefill and decode times (ms), read as Ollama's fields (ns)."""
    first = stream_part(b'data: {"index":0,"content":" w045876","tokens":[46514],"stop":false,"id_slot":-1}')
    assert first == {"response": " w045876"}
    last = stream_part('data: {"index":0,"content":"","stop":true,"model":"tracer-llama:test",'
                       '"tokens_predicted":5,"tokens_evaluated":10,'
                       '"timings":{"prompt_n":5,"prompt_ms":12.5,"predicted_n":5,"predicted_ms":6.25}}')
    assert last == {"done": True, "model": "tracer-llama:test", "prompt_eval_count": 10, "eval_count": 5,
                    "prompt_eval_duration": 12_500_000, "eval_duration": 6_250_000}
    # An object that only looks like one (no "stop") is left as it is.
    assert stream_part('{"content": "x"}') == {"content": "x"}
