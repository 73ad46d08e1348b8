"""`tracer bench interrupt --backend ...`: the same scenario on llama.cpp's llama-server alone
(its own /completion and its OpenAI API) and on llama-cpp-python in-process, against the real
server and library, on both synthetic models."""

from __future__ import annotations

import itertools
import json
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, check_order_and_sums, forwarder_held_ms, forwarder_hold_check, run_tracer

pytestmark = pytest.mark.integration

MODELS = ["tracer-gemma3:test", "tracer-llama:test"]
INTERRUPT_MS = 300


def _bench(*args: str, out: Path, env: dict[str, str] | None = None) -> Any:
    return run_tracer("bench", "interrupt", "--iterations", "3", "--warmup", "1", "--interrupt-after-ms",
                      str(INTERRUPT_MS), "--num-predict", "8", "--request-timeout", "60", "--json", str(out), *args,
                      timeout=300, env=env)


def _providers(capture: Path) -> set[str]:
    """gen_ai.provider.name of the calls a capture recorded (its spans.jsonl, the client's and the server's)."""
    rows = [json.loads(line) for line in (capture / "spans.jsonl").read_text().splitlines() if line.strip()]
    return {row["attributes"]["gen_ai.provider.name"] for row in rows
            if "gen_ai.provider.name" in row.get("attributes", {})}


def _host(testbed_engines: dict[str, Any], model: str) -> str:
    return next(s["host"] for s in testbed_engines["llama_servers"] if s["model"] == model)


@pytest.mark.parametrize("engine", ["llama-server/native", "llama-server/openai", "llama-cpp-python/library"])
@pytest.mark.parametrize("model", MODELS)
def test_each_engine_runs_the_same_scenario(testbed_engines: dict[str, Any], tmp_path: Path, model: str,
                                            engine: str) -> None:
    backend, client = engine.split("/")
    out = tmp_path / "bench.json"
    host = ["--host", _host(testbed_engines, model)] if backend == "llama-server" else []
    proc = _bench("--backend", backend, "--client", client, "--model", model, *host, out=out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["schema"] == "tracer.bench.interrupt/1"
    assert (result["backend"], result["client"], result["model"]) == (backend, client, model)
    assert result["ollama_version"] is None and result["engine_version"]
    assert len(result["iterations"]) == 4
    for it in result["iterations"]:
        interval = it["interrupt_to_first_token_ms"]
        assert 0 < interval < it["first_stage_ms"] + it["second_stage_ms"]
        assert it["first_stage_ms"] >= INTERRUPT_MS  # the interrupt came from the chunk loop, after N ms
        assert interval <= it["second_stage_ms"] + 50  # the interval ends inside the second stage
        # The engine's own counts and prefill time of the second stage, from its final chunk.
        assert it["prompt_eval_count"] > 0 and 0 < it["eval_count"] <= 8
        assert it["second_stage_timings"]["prompt_eval_ms"] > 0
        assert it["phases"] == []  # the server phases rebuilt from a response are Ollama's only
        # A server saw the interrupted connection close; in-process there is none to see.
        assert it["disconnect_verified"] is (True if backend == "llama-server" else None)
    assert result["summary"]["interrupt_to_first_token_ms"]["n"] == 3
    assert "river" not in out.read_text()  # no prompt text without --record-content
    assert f"via {client} ({backend} " in proc.stdout


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_engine_that_is_not_there_is_refused_in_one_sentence(testbed_engines: dict[str, Any],
                                                               tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cases = [
        (["--backend", "llama-server", "--host", f"http://127.0.0.1:{_closed_port()}", "--model", MODELS[0]], 3,
         "llama-server is not reachable", None),
        (["--backend", "llama-server", "--host", _host(testbed_engines, MODELS[1]), "--model", MODELS[0]], 4,
         "pass its --alias as --model", None),
        (["--backend", "llama-server", "--client", "sdk", "--host", _host(testbed_engines, MODELS[0]),
          "--model", MODELS[0]], 2, "is not a llama-server client", None),
        (["--backend", "llama-cpp-python", "--model", str(tmp_path / "missing.gguf")], 4,
         "neither a GGUF file nor a testbed model", None),
        # A llama.cpp the package cannot load (an empty library directory) is a missing dependency.
        (["--backend", "llama-cpp-python", "--model", MODELS[0]], 6, "llama-cpp-python is not installed or cannot",
         {"LLAMA_CPP_LIB_PATH": str(tmp_path)}),
    ]
    for args, code, words, env in cases:
        proc = _bench(*args, out=out, env=env)
        assert proc.returncode == code, (args, proc.returncode, proc.stderr)
        error = [line for line in proc.stderr.splitlines() if line.startswith("tracer: error")]
        assert len(error) == 1 and words in error[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert not out.exists()


def test_the_engines_benchmark_measures_every_engine_in_one_run(testbed_engines: dict[str, Any],
                                                                tmp_path: Path) -> None:
    """benchmarks/engines.py, one short round: a row per engine, each with its own measured
    iterations, and ratios to both Ollama versions measured in the same run."""
    out = tmp_path / "engines.json"
    proc = subprocess.run([sys.executable, str(Path(REPO) / "benchmarks" / "engines.py"), "--rounds", "1",
                           "--iterations", "2", "--models", MODELS[1], "--json", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {row["engine"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"ollama 0.13.5", "ollama 0.34.4", "llama-server native", "llama-server openai",
                         "llama-cpp-python"}
    for engine, row in rows.items():
        assert row["n"] == 2 and 0 < row["median_ms"] <= row["p95_ms"], row
        assert row["parts"] and all(ms >= 0 for _, ms in row["parts"]), row
        for baseline in ("ollama 0.13.5", "ollama 0.34.4"):
            low, high = row[f"ci_to {baseline}"]
            assert low <= row[f"ratio_to {baseline}"] <= high, row
        assert f"| {engine} | {MODELS[1]} | 2 |" in proc.stdout
    # On Ollama the parts are its server phases; elsewhere the engine's own prefill and the rest.
    assert {name for name, _ in rows["ollama 0.34.4"]["parts"]} >= {"runner.prefill", "server.receive"}
    assert {name for name, _ in rows["llama-cpp-python"]["parts"]} == {
        "engine prefill", "rest (HTTP, tokenize, first decode, client)"}


@pytest.mark.parametrize("client", ["native", "openai"])
@pytest.mark.parametrize("model", MODELS)
def test_a_capture_around_llama_server_alone_splits_its_own_phases(testbed_engines: dict[str, Any], tmp_path: Path,
                                                                    model: str, client: str) -> None:
    """`tracer capture` around the llama-server backend: the server is llama-server itself (the
    llama-server-alone design), eBPF splits its receive, admission, prefill and sampling, and the
    interval is covered. Cross-checked against llama-server's own timer: its prompt time runs from
    the prompt's processing to the first sampled token, so it is our prefill plus sample."""
    host, out, bench = _host(testbed_engines, model), tmp_path / "cap", tmp_path / "bench.json"
    proc = run_tracer("capture", "-o", str(out), "--force", "--ollama-host", host, "--", sys.executable, "-m",
                      "ollama_tracer", "bench", "interrupt", "--backend", "llama-server", "--client", client,
                      "--host", host, "--model", model, "--iterations", "6", "--interrupt-after-ms",
                      str(INTERRUPT_MS), "--request-timeout", "60", "--json", str(bench), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "raw" / "ebpf_meta.json").read_text())["plan"]["design"] == "llama-server-alone"
    assert _providers(out) == {"llama.cpp"}  # the engine's own name, on /v1 as on /completion
    attribution = json.loads((out / "attribution.json").read_text())
    measured = [iv for iv in attribution["intervals"] if not iv["warmup"] and iv["kind"] == "interrupt"]
    assert len(measured) == 6, attribution["intervals"]
    assert attribution["summary"]["coverage"] >= 0.95, attribution["summary"]
    own = {it["trace_id"]: it["second_stage_timings"]["prompt_eval_ms"]
           for it in json.loads(bench.read_text())["iterations"]}
    ours, theirs = [], []
    for iv in measured:
        ebpf = [p for p in iv["phases"] if p["source"] == "ebpf"]
        names = [p["name"] for p in ebpf]
        assert names[:4] == ["server.receive", "runner.admit", "runner.prefill", "runner.sample"], names
        for a, b in itertools.pairwise(ebpf):
            assert a["end_ns"] <= b["start_ns"] + 1_000, (a, b)  # in order, never overlapping
        phase = {p["name"]: p["duration_ms"] for p in ebpf}
        ours.append(phase["runner.prefill"] + phase["runner.sample"])
        theirs.append(own[iv["trace_id"]])
    gap = statistics.median(o - t for o, t in zip(ours, theirs, strict=True))
    assert abs(gap) <= max(1.5, 0.25 * statistics.median(theirs)), (ours, theirs)


def test_a_capture_around_llama_cpp_python_finds_its_interrupts(testbed_engines: dict[str, Any],
                                                                 tmp_path: Path) -> None:
    """In-process, there is no server to probe: the bench's own GenAI spans of each call give the
    capture its intervals (the interrupt, then the next call's first token), with client phases."""
    out = tmp_path / "cap"
    proc = run_tracer("capture", "-o", str(out), "--force", "--", sys.executable, "-m", "ollama_tracer", "bench",
                      "interrupt", "--backend", "llama-cpp-python", "--model", MODELS[1], "--iterations", "4",
                      "--interrupt-after-ms", str(INTERRUPT_MS), timeout=600, env={"OLLAMA_HOST": "127.0.0.1:9"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    attribution = json.loads((out / "attribution.json").read_text())
    measured = [iv for iv in attribution["intervals"] if not iv["warmup"]]
    assert [iv["kind"] for iv in measured] == ["interrupt"] * 4, attribution["intervals"]
    assert _providers(out) == {"llama.cpp"}
    for iv in measured:
        names = [p["name"] for p in iv["phases"]]
        assert names[:3] == ["client.interrupt", "client.gap", "client.request"] and "client.first_token" in names
        assert all(p["source"] == "client" for p in iv["phases"])


def test_a_delay_in_front_of_llama_server_lands_in_the_forwarder_not_in_it(testbed_engines: dict[str, Any],
                                                                            tmp_path: Path) -> None:
    """Ground truth on the llama-server-alone design: our own forwarder (tests/targets/delay_forwarder.py)
    in front of llama-server passes each request on at once, then holds it 40 ms. Per request, what it
    held by its own clock is paired with its phase: the phase less the hold must not move, and
    llama-server's receive must not grow. Every interval also keeps llama-server's own phases."""
    upstream = int(_host(testbed_engines, MODELS[1]).rsplit(":", 1)[1])
    arms: dict[float, list[tuple[float, float, float]]] = {}
    for delay_s in (0.0, 0.04):
        relay = subprocess.Popen([sys.executable, str(Path(REPO) / "tests" / "targets" / "delay_forwarder.py"),
                                  str(upstream), str(delay_s)], stdout=subprocess.PIPE, text=True, cwd=REPO)
        out = tmp_path / f"cap{delay_s}"
        try:
            assert relay.stdout is not None
            front = f"http://127.0.0.1:{int(relay.stdout.readline())}"
            proc = run_tracer("capture", "-o", str(out), "--force", "--ollama-host", front, "--", sys.executable,
                              "-m", "ollama_tracer", "bench", "interrupt", "--backend", "llama-server", "--host", front,
                              "--model", MODELS[1], "--iterations", "7", "--interrupt-after-ms", str(INTERRUPT_MS),
                              "--request-timeout", "60", timeout=600)
        finally:
            relay.terminate()
            said, _ = relay.communicate(timeout=30)
        assert proc.returncode == 0, proc.stderr[-2000:]
        capture = json.loads((out / "capture.json").read_text())
        assert capture["ollama"]["deployment"]["forwarder"]["name"] == "delay-forwarder"
        rows = []
        for iv in [iv for iv in json.loads((out / "attribution.json").read_text())["intervals"] if not iv["warmup"]]:
            check_order_and_sums(iv)
            phases = {p["name"]: p for p in iv["phases"]}
            assert {"forwarder.request", "server.receive", "runner.prefill", "runner.sample"} <= set(phases), phases
            rows.append((phases["forwarder.request"]["duration_ms"],
                         forwarder_held_ms(said, phases["client.request"]["start_ns"]),
                         phases["server.receive"]["duration_ms"]))
        arms[delay_s] = rows
    print(forwarder_hold_check(arms))
