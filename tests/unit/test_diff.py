"""`tracer diff`'s computation on synthetic attributions: verdicts, bootstrap intervals, schema."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from ollama_tracer.attribution.diff import SCHEMA, CaptureSide, compare, describe
from ollama_tracer.cli import main
from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.exporters.diff_table import render

# Per-interval milliseconds of each phase, in critical-path order, as a capture's intervals hold them.
BASE = {
    "client.interrupt": [1.1, 1.3, 0.9, 1.2, 1.0, 1.4, 1.1, 1.2],
    "server.model_lookup": [100.0, 104.0, 98.0, 102.0, 101.0, 99.0, 103.0, 97.0],
    "runner.prefill": [12.0, 12.5, 11.8, 12.2, 12.1, 11.9, 12.4, 12.3],
}


def _interval(index: int, phases: dict[str, float], warmup: bool = False, unattributed_ms: float = 0.5,
              off_path: dict[str, float] | None = None) -> dict[str, Any]:
    start = 1_000_000_000 * (index + 1)
    cursor = start
    rows = []
    for name, ms in phases.items():
        end = cursor + int(ms * 1e6)
        rows.append({"name": name, "start_ns": cursor, "end_ns": end, "duration_ms": ms, "source": "ebpf",
                     "process": "server"})
        cursor = end
    end_ns = cursor + int(unattributed_ms * 1e6)
    return {
        "index": index, "kind": "interrupt", "warmup": warmup, "model": "tracer-llama:test",
        "start_ns": start, "end_ns": end_ns, "duration_ms": (end_ns - start) / 1e6,
        "phases": rows, "unattributed_ms": unattributed_ms,
        "off_critical_path": [{"name": name, "start_ns": start - 1_000_000, "end_ns": start, "duration_ms": ms,
                               "source": "ebpf", "process": "server"} for name, ms in (off_path or {}).items()],
    }


def _attribution(columns: dict[str, list[float]], warmups: int = 1) -> dict[str, Any]:
    count = len(next(iter(columns.values())))
    intervals = [_interval(0, {name: 500.0 for name in columns}, warmup=True)] * warmups
    intervals += [_interval(warmups + i, {name: values[i] for name, values in columns.items()})
                  for i in range(count)]
    return {"schema": "tracer.attribution/1", "intervals": intervals}


def _meta(**ollama: Any) -> dict[str, Any]:
    return {"schema": "tracer.capture/1", "command": ["/usr/bin/python3", "-m", "ollama_tracer", "bench", "interrupt"],
            "collectors": {"client_spans": {"ran": True}, "ebpf": {"ran": True}, "nvml": {"ran": False}},
            "ollama": {"host": "http://127.0.0.1:11434", "version": "0.13.5", **ollama}}


def _side(label: str, columns: dict[str, list[float]], **ollama: Any) -> CaptureSide:
    return describe(label, _meta(**ollama), _attribution(columns))


def _row(document: dict[str, Any], name: str) -> dict[str, Any]:
    return next(row for row in document["rows"] if row["name"] == name)


def test_identical_distributions_show_no_significant_change() -> None:
    document = compare(_side("A", BASE), _side("B", BASE))
    assert [row["name"] for row in document["rows"]] == [*BASE, "unattributed", "interval"]
    for row in document["rows"]:
        assert not row["significant"], row
        assert row["verdict"] == "no significant change"
        assert row["change_ms"] == 0
        low, high = row["ci95_ms"]
        assert low <= 0 <= high
    assert document["notes"] == []


def test_a_50_ms_shift_on_one_phase_is_significant_and_its_interval_holds_50() -> None:
    shifted = dict(BASE, **{"server.model_lookup": [v + 50 for v in BASE["server.model_lookup"]]})
    document = compare(_side("A", BASE), _side("B", shifted))
    row = _row(document, "server.model_lookup")
    assert (row["n_a"], row["n_b"]) == (8, 8)
    assert row["significant"] and row["verdict"] == "slower"
    assert row["change_ms"] == pytest.approx(50)
    low, high = row["ci95_ms"]
    assert 0 < low <= 50 <= high
    assert row["change_percent"] == pytest.approx(100 * 50 / 100.5, abs=0.01)
    assert row["change_ratio"] == pytest.approx(150.5 / 100.5, abs=1e-4)
    assert _row(document, "interval")["verdict"] == "slower"
    for name in ("client.interrupt", "runner.prefill", "unattributed"):
        assert not _row(document, name)["significant"]
    # and back: B → A is as much faster
    back = _row(compare(_side("B", shifted), _side("A", BASE)), "server.model_lookup")
    assert back["verdict"] == "faster" and back["change_ms"] == pytest.approx(-50)


def test_a_phase_only_in_b_is_reported_and_placed_in_critical_path_order() -> None:
    loads = {"client.interrupt": BASE["client.interrupt"], "server.model_load": [420.0, 433.0, 418.0, 425.0,
             429.0, 422.0, 431.0, 427.0], "server.model_lookup": BASE["server.model_lookup"],
             "runner.prefill": BASE["runner.prefill"]}
    document = compare(_side("A", BASE), _side("B", loads))
    names = [row["name"] for row in document["rows"]]
    assert names.index("client.interrupt") < names.index("server.model_load") < names.index("server.model_lookup")
    row = _row(document, "server.model_load")
    assert row["only_in"] == "B" and (row["n_a"], row["n_b"]) == (0, 8)
    assert row["median_a_ms"] is None and row["median_b_ms"] == pytest.approx(426.0)
    assert row["change_ms"] == pytest.approx(426.0) and row["change_percent"] is None
    assert row["significant"] and row["verdict"] == "new in B"
    assert row["ci95_ms"][0] > 400
    gone = _row(compare(_side("B", loads), _side("A", BASE)), "server.model_load")
    assert gone["only_in"] == "A" and gone["verdict"] == "gone in B" and gone["ci95_ms"][1] < -400


def test_a_phase_absent_from_some_intervals_counts_zero_there() -> None:
    # A reload in 2 of 8 intervals: its median is 0, it is not a significant new phase.
    sometimes = dict(BASE, **{"server.model_load": [0.0] * 6 + [420.0, 430.0]})
    side = _side("B", sometimes)
    assert side.phases["server.model_load"] == [0.0] * 6 + [420.0, 430.0]
    row = _row(compare(_side("A", BASE), side), "server.model_load")
    assert row["n_b"] == 8 and row["median_b_ms"] == 0 and not row["significant"]
    assert row["verdict"] == "only in B, not significant"


def test_pieces_of_one_phase_in_an_interval_are_summed() -> None:
    attribution = _attribution({"client.interrupt": [1.0, 2.0]})
    interval = attribution["intervals"][1]
    piece = dict(interval["phases"][0], duration_ms=0.25)
    interval["phases"].append(piece)
    side = describe("A", _meta(), attribution)
    assert side.phases["client.interrupt"] == [1.25, 2.0]
    assert side.intervals == 2  # the warm-up is excluded


def test_the_bootstrap_is_reproducible_and_the_seed_matters() -> None:
    noisy_b = {name: [v * (1 + 0.03 * ((i * 7) % 5 - 2)) for i, v in enumerate(values)]
               for name, values in BASE.items()}
    first = compare(_side("A", BASE), _side("B", noisy_b), seed=7)
    again = compare(_side("A", BASE), _side("B", noisy_b), seed=7)
    assert json.dumps(first) == json.dumps(again)
    other = compare(_side("A", BASE), _side("B", noisy_b), seed=8)
    assert [r["ci95_ms"] for r in other["rows"]] != [r["ci95_ms"] for r in first["rows"]]
    # a phase added to one capture does not move the other rows' intervals
    added = dict(noisy_b, **{"server.model_load": [400.0] * 8})
    with_load = compare(_side("A", BASE), _side("B", added), seed=7)
    assert _row(with_load, "runner.prefill")["ci95_ms"] == _row(first, "runner.prefill")["ci95_ms"]


def test_json_schema_keys() -> None:
    document = compare(_side("A", BASE), _side("B", BASE, settings={"OLLAMA_NUM_PARALLEL": "1"}))
    assert document["schema"] == SCHEMA == "tracer.diff/1"
    assert set(document) == {"schema", "a", "b", "notes", "bootstrap", "rows"}
    assert set(document["a"]) == {"directory", "command", "models", "ollama_version", "collectors", "settings",
                                  "kinds", "intervals"}
    assert document["a"]["collectors"] == ["client_spans", "ebpf"]
    assert document["bootstrap"]["resamples"] == 2000 and document["bootstrap"]["confidence"] == 0.95
    for row in document["rows"]:
        assert set(row) == {"name", "off_critical_path", "only_in", "n_a", "n_b", "median_a_ms", "median_b_ms",
                            "change_ms", "change_ratio", "change_percent", "ci95_ms", "significant", "verdict"}
    json.dumps(document)  # plain JSON: no numpy scalars, no NaN


def test_off_path_phases_get_rows_of_their_own() -> None:
    a = describe("A", _meta(), {"intervals": [_interval(i, {"client.interrupt": 1.0}, off_path={"server.cancel": c})
                                              for i, c in enumerate([5.0, 5.2, 4.9, 5.1, 5.0, 5.3])]})
    b = describe("B", _meta(), {"intervals": [_interval(i, {"client.interrupt": 1.0}, off_path={"server.cancel": c})
                                              for i, c in enumerate([9.0, 9.2, 8.9, 9.1, 9.0, 9.3])]})
    row = _row(compare(a, b), "server.cancel")
    assert row["off_critical_path"] and row["verdict"] == "slower"
    assert not _row(compare(a, b), "interval")["significant"]


def test_notes_name_what_differs_besides_the_change() -> None:
    a = _side("A", BASE, settings={"OLLAMA_NUM_PARALLEL": "1"})
    b_meta = _meta(version="0.30.1", settings={"OLLAMA_NUM_PARALLEL": "4"})
    b_meta["collectors"]["ebpf"] = {"ran": False}
    attribution = _attribution(BASE)
    for interval in attribution["intervals"]:
        interval["model"] = "tracer-gemma3:test"
    notes = compare(a, describe("B", b_meta, attribution))["notes"]
    assert len(notes) == 4
    assert "different models" in notes[0] and "different Ollama versions (A: 0.13.5; B: 0.30.1)" in notes[1]
    assert "different collectors" in notes[2] and "OLLAMA_NUM_PARALLEL 1 → 4" in notes[3]
    few = compare(_side("A", {"x": [1.0, 2.0, 3.0]}), _side("B", {"x": [1.0, 2.0, 3.0]}))["notes"]
    assert len(few) == 1 and "A has 3 and B has 3 measured interval(s)" in few[0]


def test_a_capture_without_measured_intervals_is_one_sentence() -> None:
    only_warmup = {"intervals": [_interval(0, {"client.interrupt": 1.0}, warmup=True)]}
    with pytest.raises(TracerError) as error:
        describe("/tmp/empty-capture", _meta(), only_warmup)
    assert error.value.exit_code == ExitCode.BAD_CAPTURE
    assert error.value.message.startswith("/tmp/empty-capture has no measured intervals")
    assert error.value.message.count(". ") == 0


def test_table_shows_each_row_and_the_captures() -> None:
    loads = dict(BASE, **{"server.model_load": [420.0] * 8})
    out = io.StringIO()
    render(out, compare(_side("/caps/A", BASE), _side("/caps/B", loads)))
    text = out.getvalue()
    assert text.startswith("diff A = /caps/A: python3 -m ollama_tracer bench interrupt "
                           "(tracer-llama:test, Ollama 0.13.5")
    for name in [*loads, "unattributed", "interval"]:
        assert name in text
    assert "new in B" in text and "slower" in text and "no significant change" in text


def test_missing_directory_is_a_bad_capture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", str(tmp_path / "nope"), str(tmp_path / "nope2")]) == ExitCode.BAD_CAPTURE
    assert "does not exist" in capsys.readouterr().err
