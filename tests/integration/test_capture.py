"""`tracer capture` against the real testbed, with real Jaeger export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from ollama_tracer.testbed.runtime import free_loopback_port

from tests.conftest import REPO, run_tracer, run_tracer_healing

pytestmark = pytest.mark.integration


def _capture(testbed: dict[str, Any], out: Path, *command: str, extra: tuple[str, ...] = (),
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_tracer_healing(testbed, "capture", "-o", str(out), "--force", "--ollama-host", testbed["ollama_host"],
                              *extra, "--", *command, timeout=timeout, env={"OLLAMA_HOST": testbed["ollama_host"]})


def _bench(model: str = "tracer-gemma3:test", iterations: int = 3) -> tuple[str, ...]:
    return (sys.executable, "-m", "ollama_tracer", "bench", "interrupt", "--model", model,
            "--iterations", str(iterations), "--request-timeout", "30")


def _check_sums(attribution: dict[str, Any]) -> None:
    for interval in attribution["intervals"]:
        phases = sum(p["duration_ms"] for p in interval["phases"])
        assert abs(phases + interval["unattributed_ms"] - interval["duration_ms"]) < 0.01
        for a, b in zip(interval["phases"], interval["phases"][1:], strict=False):
            assert a["end_ns"] <= b["start_ns"], "phases overlap"
        assert all(p["source"] in ("client", "response", "ebpf", "log") for p in interval["phases"])


def test_capture_of_the_benchmark(testbed: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cap"
    proc = _capture(testbed, out, *_bench())
    assert proc.returncode == 0, proc.stderr
    assert "interrupt benchmark" in proc.stdout  # the benchmark's own table, above ours
    assert "Where the interrupt → first token time goes" in proc.stdout
    attribution = json.loads((out / "attribution.json").read_text())
    assert attribution["schema"] == "tracer.attribution/1"
    measured = [iv for iv in attribution["intervals"] if not iv["warmup"]]
    assert len(measured) == 3 and all(iv["kind"] == "interrupt" for iv in measured)
    _check_sums(attribution)
    summary = attribution["summary"]
    assert summary["coverage"] > 0.9
    names = [p["name"] for p in summary["phases"]]
    assert names[0] == "client.interrupt" and names[-1] == "client.first_token"
    # eBPF makes the server phases finer; without it they come merged from the response fields.
    assert "server.model_lookup" in names or "server.decode+model_lookup+schedule" in names
    for phase in summary["phases"]:
        assert {"mean_ms", "median_ms", "p95_ms", "share", "source"} <= set(phase)
    meta = json.loads((out / "capture.json").read_text())
    assert meta["schema"] == "tracer.capture/1" and meta["exit_code"] == 0
    assert meta["collectors"]["client_spans"]["ran"] is True
    assert meta["drops"]["client_spans"] == 0
    assert meta["clock"]["start"]["boottime"]["uncertainty_ns"] < 100_000
    assert meta["clock"]["end"] is not None
    perfetto = json.loads((out / "trace.perfetto.json").read_text())
    events = perfetto["traceEvents"]
    assert any(e["ph"] == "X" and e["name"] == "runner.prefill" for e in events)
    assert all(e["dur"] >= 0 for e in events if e["ph"] == "X")
    spans = [json.loads(line) for line in (out / "spans.jsonl").read_text().splitlines()]
    assert {s["service"] for s in spans} >= {"ollama-client", "ollama-server", "ollama-runner"}
    # user-only permissions on everything the capture wrote
    for path in [out, *out.rglob("*")]:
        assert path.stat().st_mode & 0o077 == 0, path
    # `tracer report` recomputes the same attribution from the directory alone
    again = run_tracer("report", str(out), "--format", "json", timeout=60)
    assert again.returncode == 0
    assert json.loads(again.stdout)["summary"] == summary


def test_child_exit_code_is_the_capture_exit_code(testbed: dict[str, Any], tmp_path: Path) -> None:
    proc = _capture(testbed, tmp_path / "cap", sys.executable, "-c", "import sys; sys.exit(3)")
    assert proc.returncode == 3
    assert json.loads((tmp_path / "cap" / "capture.json").read_text())["exit_code"] == 3


def _jaeger_traces(query: str, service: str) -> list[dict[str, Any]]:
    response = requests.get(f"{query}/api/traces", params={"service": service, "limit": 1000}, timeout=10)
    response.raise_for_status()
    return list(response.json()["data"])


def _wait_for_traces(query: str, trace_ids: set[str], timeout_s: float = 20) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    found: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        found = {t["traceID"]: t for t in _jaeger_traces(query, "ollama-client") if t["traceID"] in trace_ids}
        if set(found) == trace_ids:
            break
        time.sleep(0.5)
    return found


def _check_jaeger_trace(trace: dict[str, Any], expected_spans: int) -> None:
    processes = {pid: p["serviceName"] for pid, p in trace["processes"].items()}
    spans = trace["spans"]
    assert len(spans) == expected_spans
    by_id = {s["spanID"]: s for s in spans}
    names = {s["operationName"] for s in spans}
    assert {"bench.interrupt.iteration", "client.interrupt", "client.request", "client.first_token",
            "runner.prefill", "tracer.interval"} <= names
    assert any(n.startswith("server.") and "model_lookup" in n for n in names)
    for span in spans:
        for ref in span["references"]:
            assert ref["refType"] == "CHILD_OF" and ref["spanID"] in by_id
        service = processes[span["processID"]]
        if span["operationName"].startswith("server."):
            assert service == "ollama-server"
        if span["operationName"].startswith("runner."):
            assert service == "ollama-runner"
    roots = [s for s in spans if not s["references"]]
    assert [r["operationName"] for r in roots] == ["bench.interrupt.iteration"]


def test_export_to_the_real_jaeger(testbed_jaeger: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cap"
    jaeger = testbed_jaeger["jaeger"]
    proc = _capture(testbed_jaeger, out, *_bench(iterations=2), extra=("--otlp-endpoint", jaeger["otlp_grpc"]))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "export.json").read_text())["status"] == "exported"
    spans = [json.loads(line) for line in (out / "spans.jsonl").read_text().splitlines()]
    expected: dict[str, int] = {}
    for span in spans:
        expected[span["traceId"]] = expected.get(span["traceId"], 0) + 1
    found = _wait_for_traces(jaeger["query"], set(expected))
    assert set(found) == set(expected)
    for trace_id, trace in found.items():
        _check_jaeger_trace(trace, expected[trace_id])


def test_jaeger_down_loses_nothing_and_export_works_later(testbed_jaeger: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cap"
    dead = f"http://127.0.0.1:{free_loopback_port()}"
    proc = _capture(testbed_jaeger, out, *_bench(iterations=1), extra=("--otlp-endpoint", dead))
    assert proc.returncode == 0, proc.stderr
    assert "tracer export" in proc.stderr  # the warning says how to send it later
    assert json.loads((out / "export.json").read_text())["status"] == "failed"
    jaeger = testbed_jaeger["jaeger"]
    later = run_tracer("export", str(out), "--otlp-endpoint", jaeger["otlp_http"], "--otlp-protocol",
                       "http/protobuf", timeout=120)
    assert later.returncode == 0, later.stderr
    spans = [json.loads(line) for line in (out / "spans.jsonl").read_text().splitlines()]
    expected: dict[str, int] = {}
    for span in spans:
        expected[span["traceId"]] = expected.get(span["traceId"], 0) + 1
    found = _wait_for_traces(jaeger["query"], set(expected))
    assert {t: len(found[t]["spans"]) for t in found} == expected


def test_export_to_a_dead_endpoint_fails_clearly(testbed: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cap"
    assert _capture(testbed, out, *_bench(iterations=1)).returncode == 0
    dead = f"http://127.0.0.1:{free_loopback_port()}"
    proc = run_tracer("export", str(out), "--otlp-endpoint", dead, timeout=120)
    assert proc.returncode == 8
    assert len(proc.stderr.strip().splitlines()) == 1 and "nothing is lost" in proc.stderr


PLAIN_SCRIPT = textwrap.dedent(
    """
    import ollama
    client = ollama.Client(timeout=30)  # OLLAMA_HOST from the environment
    for model in ("tracer-llama:test", "tracer-gemma3:test"):
        client.generate(model=model, prompt="hello", options={"num_predict": 4})
        stream = client.generate(model=model, prompt="Tell me a story", stream=True)
        for i, _ in enumerate(stream):
            if i == 5:
                break
        stream.close()
        for _ in client.generate(model=model, prompt="Again", stream=True, options={"num_predict": 4}):
            pass
    """
)


def test_plain_script_is_captured_without_tracer_code(testbed: dict[str, Any], tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(PLAIN_SCRIPT)
    out = tmp_path / "cap"
    proc = _capture(testbed, out, sys.executable, str(script))
    assert proc.returncode == 0, proc.stderr
    attribution = json.loads((out / "attribution.json").read_text())
    kinds = [iv["kind"] for iv in attribution["intervals"]]
    assert kinds == ["request", "interrupt", "request", "interrupt"]
    _check_sums(attribution)
    assert {iv["model"] for iv in attribution["intervals"]} == {"tracer-llama:test", "tracer-gemma3:test"}


OWN_SDK_SCRIPT = textwrap.dedent(
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), max_queue_size=40000))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("app")
    for i in range(N):
        with tracer.start_as_current_span("app.work") as span:
            span.set_attribute("i", i)
    trace.get_tracer_provider().shutdown()
    """
)


@pytest.mark.parametrize("auto", [True, False], ids=["auto-instrumented", "own-sdk-only"])
def test_a_child_with_its_own_sdk_lands_complete(testbed: dict[str, Any], tmp_path: Path, auto: bool) -> None:
    script = tmp_path / "app.py"
    script.write_text(OWN_SDK_SCRIPT.replace("N", "20000"))
    out = tmp_path / "cap"
    extra = () if auto else ("--no-auto-instrument",)
    proc = _capture(testbed, out, sys.executable, str(script), extra=extra, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = (out / "raw" / "client_spans.jsonl").read_text().splitlines()
    assert sum(1 for r in rows if '"app.work"' in r) == 20000
    meta = json.loads((out / "capture.json").read_text())
    assert meta["drops"]["client_spans"] == 0
    assert meta["collectors"]["client_spans"]["stats"]["received_spans"] == 20000


def test_sigint_mid_capture_leaves_a_readable_capture(testbed: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cap"
    env = dict(os.environ, OLLAMA_HOST=testbed["ollama_host"], PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ollama_tracer", "capture", "-o", str(out), "--", *_bench(iterations=50)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    spans_file = out / "raw" / "client_spans.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if spans_file.exists() and spans_file.read_text().count("bench.interrupt.iteration") >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    meta = json.loads((out / "capture.json").read_text())
    assert meta["interrupted"] is True and meta["signals"][0] == "SIGINT"
    report = run_tracer("report", str(out), "--format", "json", timeout=60)
    assert report.returncode == 0, report.stderr
    attribution = json.loads(report.stdout)
    assert len(attribution["intervals"]) >= 2
    _check_sums(attribution)


def test_bad_input(testbed: dict[str, Any], tmp_path: Path) -> None:
    missing = run_tracer("capture", "-o", str(tmp_path / "c1"), "--", "no-such-command-xyz", timeout=60)
    assert missing.returncode == 127 and "no-such-command-xyz" in missing.stderr
    assert not (tmp_path / "c1").exists()
    protocol = run_tracer("capture", "--otlp-protocol", "carrier-pigeon", "--", "true", timeout=60)
    assert protocol.returncode == 2 and "--otlp-protocol" in protocol.stderr
    for directory, setup in (("missing", None), ("empty", ""), ("corrupt", "{not json")):
        path = tmp_path / directory
        if setup is not None:
            path.mkdir()
            if setup:
                (path / "capture.json").write_text(setup)
        report = run_tracer("report", str(path), timeout=60)
        assert report.returncode == 7, (directory, report.stderr)
        assert len(report.stderr.strip().splitlines()) == 1
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    busy = run_tracer("capture", "-o", str(tmp_path / "busy"), "--", "true", timeout=60)
    assert busy.returncode == 10 and "--force" in busy.stderr
    forced = run_tracer("capture", "-o", str(tmp_path / "busy"), "--force", "--", "true", timeout=60)
    assert forced.returncode == 0
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
