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
