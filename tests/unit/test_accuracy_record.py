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
