"""The accuracy every report quotes: what benchmarks/accuracy.py --record writes, as read back."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from ollama_tracer import units

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_record_is_quoted() -> None:
    statement = units.accuracy_statement()
    assert statement is not None and "benchmarks/accuracy.py" in statement and "0.34.4" in statement
    record = json.loads((REPO / "tracer" / "accuracy.json").read_text())
    assert f"{record['right_phase']}/{record['cases']} injected cases" in statement


def test_the_harness_summary_is_what_the_statement_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("accuracy", REPO / "benchmarks" / "accuracy.py")
    assert spec is not None and spec.loader is not None
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    rows = [{"case": "request path", "phase": "server.receive", "injected_ms": 40.0, "error_ms": -3.0, "ok": True},
            {"case": "prefill", "phase": "runner.prefill", "injected_ms": 1000.0, "error_ms": 20.0, "ok": True},
            {"case": "cold", "phase": "server.model_load", "injected_ms": None, "error_ms": None, "ok": False}]
    summary = harness.summary({"9.9.9": rows})
    assert (summary["cases"], summary["right_phase"], summary["timed"], summary["on_target"]) == (3, 2, 2, 1)
    assert summary["worst"]["case"] == "request path"  # 3 ms off a 1 ms target; 20 ms of 50 ms is on target
    fake = tmp_path / "units.py"
    (tmp_path / "accuracy.json").write_text(json.dumps(summary))
    monkeypatch.setattr(units, "__file__", str(fake))
    statement = units.accuracy_statement()
    assert statement is not None and "2/3 injected cases" in statement and "1/2 timed" in statement
    (tmp_path / "accuracy.json").write_text("{not json")
    assert units.accuracy_statement() is None  # a broken record is left out, never a crash


def test_the_relays_added_delay_is_its_own_requests_never_the_next_ones() -> None:
    """An undelayed forward can come before the client's client.request span ends (the span is
    recorded a moment after its write). Matching "the first send after the span's end" then took
    the next request's send, and the harness once measured -2 ms injected for a 40 ms delay."""
    from ollama_tracer.testbed.relay import DelayRelay

    relay = DelayRelay(9, 0.0)  # nothing is forwarded: only the bookkeeping is used
    try:
        ms = 1_000_000
        relay.received_ns[:] = [100 * ms, 500 * ms]  # two requests: received, and sent on
        relay.sent_ns[:] = [100 * ms + 20_000, 500 * ms + 40 * ms]
        assert relay.request_added_ns(99 * ms, 100 * ms + 50_000) == 0  # forwarded before the span ended
        assert relay.request_added_ns(499 * ms, 500 * ms + 100_000) == 40 * ms - 100_000
        assert relay.request_added_ns(501 * ms, 502 * ms) is None
    finally:
        relay.close()


def test_a_relay_cycling_its_close_hold_holds_each_connection_by_its_own_turn() -> None:
    """The slot case's relay holds each connection's close by the next of its delays, and records
    which it was asked and what it held; the harness matches a close to its interval by time."""
    import socket
    import time

    from ollama_tracer.testbed.relay import CLOSE, DelayRelay

    upstream = socket.create_server(("127.0.0.1", 0))
    relay = DelayRelay(upstream.getsockname()[1], 0.0, CLOSE, cycle_s=(0.01, 0.06))
    spec = importlib.util.spec_from_file_location("accuracy", REPO / "benchmarks" / "accuracy.py")
    assert spec is not None and spec.loader is not None
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    try:
        starts = []
        for _ in range(3):
            client = socket.create_connection(("127.0.0.1", relay.port))
            server_side, _ = upstream.accept()
            client.sendall(b"POST /api/generate HTTP/1.1\r\n\r\n")
            assert server_side.recv(100).startswith(b"POST")
            starts.append(time.time_ns())
            client.close()
            server_side.settimeout(5)
            began = time.monotonic()
            assert server_side.recv(100) == b""  # the close reaches the server only after the hold
            assert time.monotonic() - began >= (0.01, 0.06, 0.01)[len(starts) - 1] * 0.9
            server_side.close()
        deadline = time.monotonic() + 5
        while len(relay.closes_ns) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.close_delays_s == [0.01, 0.06, 0.01]
        pairs = zip(relay.closes_ns, relay.close_delays_s, strict=True)
        assert all(sent - seen >= asked * 1e9 for (seen, sent), asked in pairs)

        def interval(start: int, request_ns: int) -> dict[str, object]:
            return {"start_ns": start, "end_ns": start + 200_000_000,
                    "phases": [{"name": "client.request", "start_ns": request_ns}]}

        asked, waited = harness._close_of(interval(starts[1], starts[1] + 1_000_000), relay)
        assert asked == 60.0 and 55.0 <= waited < 200.0  # passed on >= 60 ms after its close, 1 ms after it
        _asked, waited = harness._close_of(interval(starts[1], starts[1] + 150_000_000), relay)
        assert waited < 0  # the next request began after the close was passed on: it waited for nothing
        assert harness._close_of(interval(starts[0] - 10**9, starts[0] - 10**9), relay) is None
    finally:
        relay.close()
        upstream.close()
