"""The Perfetto exporter: valid Chrome-trace JSON, one process per traced process, strictly nested tracks."""

from __future__ import annotations

import io
import json
import stat
from collections import defaultdict
from pathlib import Path
from typing import Any

from ollama_tracer.attribution.analysis import ExportData
from ollama_tracer.exporters import perfetto, write_rendered

T0 = 1_760_000_000_000_000_000  # an epoch-ns origin, as real captures have
MS = 1_000_000
TRACE_A = "a" * 32
TRACE_B = "b" * 32


def _span(span_id: str, name: str, start_ms: float, end_ms: float, *, trace_id: str = TRACE_A,
          parent: str = "", pid: int | None = None, events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {"service.name": "ollama-client"}
    if pid is not None:
        resource["process.pid"] = pid
    return {
        "traceId": trace_id, "spanId": span_id, "parentSpanId": parent, "name": name, "kind": 3,
        "startTimeUnixNano": T0 + int(start_ms * MS), "endTimeUnixNano": T0 + int(end_ms * MS),
        "attributes": {"gen_ai.provider.name": "ollama"}, "events": events or [],
        "status": {"code": 0, "message": ""}, "resource": resource, "service": "ollama-client",
    }


def _phase(name: str, start_ms: float, end_ms: float, process: str, source: str = "ebpf") -> dict[str, Any]:
    return {"name": name, "start_ns": T0 + int(start_ms * MS), "end_ns": T0 + int(end_ms * MS),
            "duration_ms": end_ms - start_ms, "source": source, "process": process}


def _interval(index: int, trace_id: str, start_ms: float) -> dict[str, Any]:
    at = start_ms
    phases = [
        _phase("client.interrupt", at, at + 1, "client", "client"),
        _phase("client.request", at + 1, at + 2, "client", "client"),
        _phase("server.receive", at + 2, at + 3, "server"),
        _phase("server.decode+model_lookup", at + 3, at + 40, "server"),
        _phase("runner.prefill", at + 40, at + 120, "runner", "log"),
        _phase("client.first_token", at + 150, at + 156, "client", "response"),
    ]
    return {
        "index": index, "kind": "interrupt", "trace_id": trace_id, "iteration": index, "warmup": index == 0,
        "model": "gemma3-synthetic", "start_ns": T0 + int(at * MS), "end_ns": T0 + int((at + 156) * MS),
        "duration_ms": 156.0, "phases": phases,
        "off_critical_path": [_phase("server.cancel", at, at + 30, "server")],
        "unattributed_ms": 30.0, "coverage": 0.81,
    }


def _data(*, with_pid: bool = False) -> ExportData:
    pid = 4242 if with_pid else None
    spans = [
        _span("01", "bench.iteration", 0, 1000, pid=pid),
        _span("02", "ollama.generate", 10, 500, parent="01", pid=pid,
              events=[{"name": "first_token", "timeUnixNano": T0 + 60 * MS, "attributes": {}}]),
        _span("03", "client.interrupt", 500, 501, parent="01", pid=pid),
        # Starts inside 02 and ends after it: a partial overlap that must leave the "spans" track.
        _span("04", "ollama.generate", 400, 700, parent="01", pid=pid),
        _span("05", "bench.iteration", 2000, 3000, trace_id=TRACE_B, pid=pid),
        _span("06", "ollama.generate", 2500, 2800, trace_id=TRACE_B, parent="05", pid=pid),
    ]
    attribution = {
        "schema": "tracer.attribution/1",
        "intervals": [_interval(0, TRACE_A, 500), _interval(1, TRACE_B, 2600)],
        "summary": {},
    }
    meta = {"command": ["python", "bench.py"], "tracer_version": "0.1.0", "clock": {}, "collectors": {},
            "exit_code": 0, "drops": {"spans": 2}}
    return ExportData(meta=meta, attribution=attribution, spans=spans)


def _render(data: ExportData) -> dict[str, Any]:
    out = io.StringIO()
    perfetto.render(out, data)
    trace: dict[str, Any] = json.loads(out.getvalue())
    return trace


def _thread_names(trace: dict[str, Any]) -> dict[tuple[int, int], str]:
    return {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
            if e["ph"] == "M" and e["name"] == "thread_name"}


def _process_names(trace: dict[str, Any]) -> dict[int, str]:
    return {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"}


def assert_properly_nested(events: list[dict[str, Any]]) -> None:
    """Every two complete events on one (pid, tid) are disjoint or one contains the other."""
    tracks: dict[tuple[int, int], list[tuple[int, int, str]]] = defaultdict(list)
    for event in events:
        if event["ph"] == "X":
            start = round(event["ts"] * 1000)  # back to integer ns, as Perfetto's importer does
            tracks[(event["pid"], event["tid"])].append((start, start + round(event["dur"] * 1000), event["name"]))
    for track, slices in tracks.items():
        open_slices: list[tuple[int, int, str]] = []
        for start, end, name in sorted(slices, key=lambda s: (s[0], -s[1])):
            while open_slices and open_slices[-1][1] <= start:
                open_slices.pop()
            if open_slices:
                parent = open_slices[-1]
                assert end <= parent[1], f"{name} partially overlaps {parent[2]} on track {track}"
            open_slices.append((start, end, name))


def test_renders_valid_trace_event_json() -> None:
    trace = _render(_data())
    assert set(trace) == {"traceEvents", "displayTimeUnit", "metadata"}
    assert trace["displayTimeUnit"] == "ms"
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert complete
    for event in complete:
        assert isinstance(event["ts"], float) and event["ts"] >= 0
        assert isinstance(event["dur"], float) and event["dur"] >= 0
        assert isinstance(event["pid"], int) and isinstance(event["tid"], int)
    # Relative to the earliest timestamp: the first span starts at 0.
    assert min(e["ts"] for e in complete) == 0.0
    assert trace["metadata"]["epoch_origin_ns"] == T0
    assert trace["metadata"]["epoch_origin_us"] == T0 / 1000


def test_one_process_per_service_with_synthetic_pids() -> None:
    trace = _render(_data())
    assert _process_names(trace) == {1: "ollama-client", 2: "ollama-server", 3: "ollama-runner"}
    threads = _thread_names(trace)
    assert {name for (pid, _), name in threads.items() if pid == 1} == {
        "interval", "phases", "spans", "spans (overflow 1)"}
    assert {name for (pid, _), name in threads.items() if pid == 2} == {"phases", "off critical path"}
    assert {name for (pid, _), name in threads.items() if pid == 3} == {"phases"}


def test_real_pid_is_used_and_client_phases_join_it() -> None:
    trace = _render(_data(with_pid=True))
    names = _process_names(trace)
    assert names[4242] == "ollama-client"
    assert "ollama-client" not in {name for pid, name in names.items() if pid != 4242}
    threads = _thread_names(trace)
    client_phases = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["name"] == "client.request"]
    assert {(e["pid"], threads[(e["pid"], e["tid"])]) for e in client_phases} == {(4242, "phases")}


def test_tracks_are_properly_nested_and_overlap_moves_to_overflow() -> None:
    trace = _render(_data())
    assert_properly_nested(trace["traceEvents"])
    threads = _thread_names(trace)
    overlapping = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["name"] == "ollama.generate"
                   and e["args"]["span_id"] in {"02", "04"}]
    assert sorted(threads[(e["pid"], e["tid"])] for e in overlapping) == ["spans", "spans (overflow 1)"]


def test_nesting_checker_catches_partial_overlap() -> None:
    bad = [{"ph": "X", "name": "a", "pid": 1, "tid": 1, "ts": 0.0, "dur": 10.0},
           {"ph": "X", "name": "b", "pid": 1, "tid": 1, "ts": 5.0, "dur": 10.0}]
    try:
        assert_properly_nested(bad)
    except AssertionError:
        return
    raise AssertionError("the checker accepted a partial overlap")


def test_phases_intervals_and_span_events_are_present() -> None:
    trace = _render(_data())
    threads = _thread_names(trace)
    names = {e["name"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert {"client.interrupt", "client.request", "server.receive", "server.decode+model_lookup",
            "runner.prefill", "client.first_token", "server.cancel"} <= names
    intervals = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] == "interval"]
    assert [e["name"] for e in intervals] == ["interval 0 (interrupt)", "interval 1 (interrupt)"]
    assert intervals[0]["args"]["unattributed_ms"] == 30.0 and intervals[0]["args"]["coverage"] == 0.81
    prefill = next(e for e in trace["traceEvents"] if e["name"] == "runner.prefill" and e["args"]["interval"] == 1)
    assert prefill["args"]["source"] == "log" and prefill["args"]["trace_id"] == TRACE_B
    assert prefill["dur"] == 80_000.0
    cancel = next(e for e in trace["traceEvents"] if e["name"] == "server.cancel")
    assert threads[(cancel["pid"], cancel["tid"])] == "off critical path"
    instants = [e for e in trace["traceEvents"] if e["ph"] == "i"]
    assert [(e["name"], e["ts"]) for e in instants] == [("first_token", 60_000.0)]


def test_metadata_carries_version_schema_and_drops() -> None:
    metadata = _render(_data())["metadata"]
    assert metadata["schema"] == "tracer.perfetto/1"
    assert metadata["tracer_version"]
    assert metadata["dropped"] == {"spans": 2}
    assert metadata["overflow"] is True
    assert metadata["command"] == ["python", "bench.py"]


def test_empty_capture_renders() -> None:
    trace = _render(ExportData(meta={}, attribution={"intervals": []}, spans=[]))
    assert trace["traceEvents"] == []
    assert trace["metadata"]["dropped"] == {} and trace["metadata"]["overflow"] is False


def test_counter_events_shape() -> None:
    samples = [(T0 + 2 * MS, 55.0), (T0, 10.0), (T0 + MS, 97.5)]
    events = perfetto.counter_events("gpu.utilization", 3, samples, origin_ns=T0)
    assert events == [
        {"name": "gpu.utilization", "ph": "C", "pid": 3, "ts": 0.0, "args": {"gpu.utilization": 10.0}},
        {"name": "gpu.utilization", "ph": "C", "pid": 3, "ts": 1000.0, "args": {"gpu.utilization": 97.5}},
        {"name": "gpu.utilization", "ph": "C", "pid": 3, "ts": 2000.0, "args": {"gpu.utilization": 55.0}},
    ]


def test_write_is_private_and_matches_render(tmp_path: Path) -> None:
    path = tmp_path / "trace.perfetto.json"
    write_rendered(path, perfetto.render, _data())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text(encoding="utf-8")) == _render(_data())
