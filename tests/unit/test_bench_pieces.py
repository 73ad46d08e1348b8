from __future__ import annotations

import itertools
import socket
import time
from typing import Any

import pytest
from ollama_tracer import netstat
from ollama_tracer.attribution.response import ResponseTimings, response_phases
from ollama_tracer.bench.interrupt import summarize
from ollama_tracer.clock import parse_created_at
from ollama_tracer.instrument.genai import StreamRecorder
from opentelemetry import trace


def test_summary_reproduces_the_seed_figures() -> None:
    seed = [156.98, 160.10, 152.58, 154.50]
    s = summarize(seed)
    assert round(s["mean"] or 0, 2) == 156.04
    assert round(s["median"] or 0, 2) == 155.74
    assert (s["min"], s["max"]) == (152.58, 160.10)
    assert round(s["stdev"] or 0, 2) == 3.25  # sample (n−1), not population (2.81)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-25T03:52:04.879205378Z", 1795578724_879205378),
        ("2026-11-25T03:52:04Z", 1795578724_000000000),
        ("2026-11-25T04:52:04.5+01:00", 1795578724_500000000),
    ],
)
def test_created_at_keeps_nanoseconds(text: str, expected: int) -> None:
    assert parse_created_at(text) == expected


def test_response_phases_tile_the_server_time() -> None:
    ms = 1_000_000
    t = ResponseTimings(
        request_written_ns=1000 * ms, response_start_ns=1130 * ms,
        first_created_ns=1129 * ms, last_created_ns=1300 * ms,
        total_duration_ns=299 * ms, load_duration_ns=100 * ms, prompt_eval_duration_ns=20 * ms,
    )
    phases = response_phases(t)
    assert [(p.name, p.duration_ms) for p in phases] == [
        ("server.receive", 1.0),
        ("server.decode+model_lookup+schedule", 100.0),
        ("server.handoff+runner.admit", 8.0),
        ("runner.prefill", 20.0),
        ("server.stream", 1.0),
    ]
    assert all(p.source == "response" for p in phases)
    assert phases[0].start_ns == t.request_written_ns and phases[-1].end_ns == t.response_start_ns
    # v0.30+: after scheduleRunner come the round trips to llama-server and the semaphore wait;
    # the same 8 ms carry their names, not a bare hand-off.
    names = [p.name for p in response_phases(t, llama_server=True)]
    assert names[2] == "server.handoff+tokenize+runner_wait+runner_health+runner.admit", names


def test_response_phases_never_overlap_when_clocks_disagree() -> None:
    ms = 1_000_000
    # The handler (server clock) started 0.5 ms before the client noted its write.
    t = ResponseTimings(
        request_written_ns=1000 * ms, response_start_ns=1050 * ms, first_created_ns=1049 * ms,
        last_created_ns=1100 * ms, total_duration_ns=int(100.5 * ms), load_duration_ns=10 * ms,
        prompt_eval_duration_ns=5 * ms,
    )
    phases = response_phases(t)
    assert phases[0].duration_ns == 0
    for a, b in itertools.pairwise(phases):
        assert a.end_ns <= b.start_ns
    assert sum(p.duration_ns for p in phases) == t.response_start_ns - t.request_written_ns


def test_server_saw_close_detects_a_server_that_ignores_the_fin() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    host = f"http://127.0.0.1:{port}"
    client = socket.create_connection(("127.0.0.1", port))
    server_side, _ = listener.accept()
    client_port = client.getsockname()[1]
    assert client_port in netstat.own_client_ports(host)
    client.close()
    # The kernel got our FIN, but the "server" has not closed its end: CLOSE_WAIT.
    assert netstat.server_saw_close(host, client_port, timeout_s=0.2) is False
    server_side.close()
    assert netstat.server_saw_close(host, client_port, timeout_s=2.0) is True
    assert client_port not in netstat.own_client_ports(host)
    listener.close()


def test_server_saw_close_is_unknown_for_remote_hosts() -> None:
    assert netstat.server_saw_close("http://example.invalid:11434", 1234) is None
    assert netstat.server_saw_close("http://127.0.0.1:11434", None) is None


class _BrokenTracer:
    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("tracer is broken")


def test_a_broken_tracer_never_breaks_the_host() -> None:
    recorder = StreamRecorder(_BrokenTracer(), url="http://127.0.0.1:1/api/generate",  # type: ignore[arg-type]
                              body={"model": "m"}, stream=True)
    recorder.request_written()
    recorder.chunk({"created_at": "garbage", "done": True})
    recorder.chunk({"response": "x"})
    recorder.end(cancelled=True)  # no exception escapes


def test_instrumentors_are_idempotent_and_reversible() -> None:
    import ollama._client as _  # noqa: F401
    import requests
    from ollama._client import AsyncClient, Client
    from ollama_tracer.instrument.ollama_client import OllamaInstrumentor
    from ollama_tracer.instrument.requests_client import RequestsInstrumentor

    originals = (Client._request, AsyncClient._request, requests.Session.send)
    for instrumentor in (OllamaInstrumentor(), RequestsInstrumentor()):
        instrumentor.instrument()
        wrapped = (Client._request, AsyncClient._request, requests.Session.send)
        instrumentor.instrument()  # a second call changes nothing
        assert (Client._request, AsyncClient._request, requests.Session.send) == wrapped
        assert instrumentor.is_instrumented
        instrumentor.uninstrument()
        instrumentor.uninstrument()
        assert not instrumentor.is_instrumented
    assert (Client._request, AsyncClient._request, requests.Session.send) == originals


def test_host_exceptions_pass_through_unchanged() -> None:
    import ollama
    from ollama_tracer.instrument.ollama_client import OllamaInstrumentor

    def failure() -> BaseException:
        client = ollama.Client(host="http://127.0.0.1:9")
        try:
            list(client.generate(model="m", prompt="p", stream=True))
        except BaseException as err:
            return err
        raise AssertionError("expected a connection failure")

    plain = failure()
    OllamaInstrumentor().instrument(trace.NoOpTracerProvider())
    try:
        started = time.monotonic()
        traced = failure()
        assert time.monotonic() - started < 10
    finally:
        OllamaInstrumentor().uninstrument()
    assert type(traced) is type(plain) and str(traced) == str(plain)
