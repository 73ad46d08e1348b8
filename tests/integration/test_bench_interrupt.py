"""`tracer bench interrupt` against the real testbed, and its client spans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from ollama_tracer.autoinstrument import child_env
from ollama_tracer.collectors.otlp_receiver import OtlpReceiver

from tests.conftest import REPO, heal_testbed, run_tracer, run_tracer_healing

pytestmark = pytest.mark.integration

MODELS = ["tracer-gemma3:test", "tracer-llama:test"]
ITERATION_KEYS = {
    "index", "first_stage_ms", "second_stage_ms", "interrupt_to_first_token_ms",
    "second_stage_timings", "prompt_eval_count", "eval_count",
}
STATS = {"mean", "median", "min", "max", "stdev"}


def _bench(testbed: dict[str, Any] | None, model: str, client: str, out: Path, *extra: str,
           host: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`tracer bench interrupt` against the testbed's server (or ``host``), healed and retried once
    when the testbed's server stalls under it (no testbed: nothing to heal)."""
    target = host or (testbed or {})["ollama_host"]
    args = ("bench", "interrupt", "--host", target, "--model", model, "--client", client, "--iterations", "2",
            "--warmup", "1", "--request-timeout", "30", "--json", str(out), *extra)
    if testbed is None:
        return run_tracer(*args, timeout=300, env=env)
    return run_tracer_healing(testbed, *args, timeout=300, env=env)


@pytest.mark.parametrize("client", ["sdk", "http"])
@pytest.mark.parametrize("model", MODELS)
def test_bench_json_matches_schema(testbed: dict[str, Any], tmp_path: Path, model: str, client: str) -> None:
    out = tmp_path / "bench.json"
    proc = _bench(testbed, model, client, out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["schema"] == "tracer.bench.interrupt/1"
    assert result["model"] == model and result["client"] == client
    assert result["options"]["interrupt_after_ms"] == 500
    assert len(result["iterations"]) == 3
    for it in result["iterations"]:
        assert set(it) >= ITERATION_KEYS
        assert set(it["second_stage_timings"]) == {"total_ms", "load_ms", "prompt_eval_ms", "eval_ms"}
        interval = it["interrupt_to_first_token_ms"]
        assert 0 < interval < it["first_stage_ms"] + it["second_stage_ms"]
        assert it["first_stage_ms"] >= 500
        assert it["eval_count"] > 0 and it["prompt_eval_count"] > 0
        # The interrupt really closed the connection, and the server closed its end too.
        assert it["disconnect_verified"] is True
        # Response-derived phases tile the server's part of the interval, in order.
        names = [p["name"] for p in it["phases"]]
        assert names == ["server.receive", "server.decode+model_lookup+schedule",
                         "server.handoff+runner.admit", "runner.prefill", "server.stream"]
        for a, b in zip(it["phases"], it["phases"][1:], strict=False):
            assert a["end_ns"] <= b["start_ns"] + 1_000  # µs slack: two clocks read apart
    for figure in ("first_stage_ms", "second_stage_ms", "interrupt_to_first_token_ms"):
        assert set(result["summary"][figure]) >= STATS
        assert result["summary"][figure]["n"] == 2
    # No prompt text anywhere without --record-content.
    assert "river" not in out.read_text()
    assert "interrupt → first token" in proc.stdout


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_bench_spans_reach_an_otlp_receiver(testbed: dict[str, Any], tmp_path: Path, protocol: str) -> None:
    with OtlpReceiver() as receiver:
        endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
               "NO_PROXY": "127.0.0.1"}
        proc = _bench(testbed, "tracer-gemma3:test", "sdk", tmp_path / "b.json", env=env)
        assert proc.returncode == 0, proc.stderr
        spans = receiver.spans()
    result = json.loads((tmp_path / "b.json").read_text())
    by_trace: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        by_trace.setdefault(span["traceId"], []).append(span)
    assert len(by_trace) == 3  # one trace per iteration
    assert {it["trace_id"] for it in result["iterations"]} == set(by_trace)
    for trace_spans in by_trace.values():
        by_name: dict[str, list[dict[str, Any]]] = {}
        for span in trace_spans:
            by_name.setdefault(span["name"], []).append(span)
        (root,) = by_name["bench.interrupt.iteration"]
        assert root["parentSpanId"] == ""
        first, second = sorted(by_name["text_completion tracer-gemma3:test"], key=lambda s: s["startTimeUnixNano"])
        assert first["parentSpanId"] == second["parentSpanId"] == root["spanId"]
        # The interrupted stream: cancelled, status unset, not an error.
        assert first["attributes"]["tracer.cancelled"] is True
        assert first["status"]["code"] == 0
        assert "tracer.cancelled" not in second["attributes"]
        for span in (first, second):
            attrs = span["attributes"]
            assert attrs["gen_ai.provider.name"] == "ollama"
            assert attrs["gen_ai.operation.name"] == "text_completion"
            assert attrs["gen_ai.request.model"] == "tracer-gemma3:test"
            assert attrs["gen_ai.request.stream"] is True
            assert attrs["server.address"] == "127.0.0.1"
            assert attrs["server.port"] == int(testbed["ollama_host"].rsplit(":", 1)[1])
            assert 0 < attrs["gen_ai.response.time_to_first_chunk"] < 60
            assert span["kind"] == 3  # CLIENT
        assert second["attributes"]["gen_ai.usage.input_tokens"] > 0
        assert second["attributes"]["gen_ai.usage.output_tokens"] > 0
        assert "gen_ai.input.messages" not in second["attributes"]
        (interrupt,) = by_name["client.interrupt"]
        assert interrupt["parentSpanId"] == root["spanId"]
        request = [s for s in by_name["client.request"] if s["parentSpanId"] == second["spanId"]]
        first_token = [s for s in by_name["client.first_token"] if s["parentSpanId"] == second["spanId"]]
        assert len(request) == len(first_token) == 1
        assert interrupt["endTimeUnixNano"] <= request[0]["startTimeUnixNano"]
        assert request[0]["endTimeUnixNano"] <= first_token[0]["startTimeUnixNano"]
        for name in ("server.receive", "server.decode+model_lookup+schedule", "runner.prefill"):
            (phase,) = by_name[name]
            assert phase["attributes"]["tracer.source"] == "response"
            assert phase["parentSpanId"] == root["spanId"]


PLAIN_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    import ollama

    host, model = sys.argv[1], sys.argv[2]
    client = ollama.Client(host=host, timeout=30)
    stream = client.generate(model=model, prompt="Tell me a story", stream=True)
    for i, part in enumerate(stream):
        if i == 3:
            break
    stream.close()
    client.chat(model=model, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3})

    async def main():
        aclient = ollama.AsyncClient(host=host, timeout=30)
        async for part in await aclient.generate(model=model, prompt="Hello", stream=True,
                                                 options={"num_predict": 3}):
            pass
    asyncio.run(main())
    print("script done")
    """
)


def test_plain_ollama_script_is_instrumented_without_code_changes(testbed: dict[str, Any], tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(PLAIN_SCRIPT)
    with OtlpReceiver() as receiver:
        env = child_env(dict(os.environ, PYTHONPATH=REPO), endpoint=receiver.grpc_endpoint)
        argv = [sys.executable, str(script), testbed["ollama_host"], "tracer-llama:test"]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, check=False)
        first_run = 0
        if proc.returncode != 0 and "Timeout" in proc.stderr and heal_testbed(testbed):  # Ollama's deadlock
            time.sleep(2)  # let the first run's exporter finish, then count only the second run
            first_run = len(receiver.spans())
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "script done"
        spans = receiver.spans()[first_run:]
    names = sorted(s["name"] for s in spans)
    assert names.count("text_completion tracer-llama:test") == 2
    assert names.count("chat tracer-llama:test") == 1
    generate = sorted((s for s in spans if s["name"].startswith("text_completion")),
                      key=lambda s: s["startTimeUnixNano"])
    assert generate[0]["attributes"]["tracer.cancelled"] is True  # closed early, not lost
    assert "tracer.cancelled" not in generate[1]["attributes"]  # the async stream ran to done
    assert all(s["resource"]["service.name"] == "ollama-client" for s in spans)


def test_unknown_model_is_a_clear_error(testbed: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    proc = _bench(testbed, "no-such-model:latest", "sdk", out)
    assert proc.returncode == 4
    assert "no-such-model" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_ollama_down_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    proc = _bench(None, "tracer-llama:test", "http", out, host="http://127.0.0.1:9")
    assert proc.returncode == 3
    assert "not reachable" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_zero_interrupt_is_a_usage_error(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    proc = _bench(None, "m", "sdk", out, "--interrupt-after-ms", "0", host="http://127.0.0.1:9")
    assert proc.returncode == 2
    assert "--interrupt-after-ms" in proc.stderr
    assert not list(tmp_path.iterdir())
