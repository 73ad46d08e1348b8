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
import time
from pathlib import Path
from typing import Any

import pytest
from ollama_tracer.bench.interrupt import DEFAULT_SECOND_PROMPT

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


@pytest.mark.parametrize("model", MODELS)
def test_a_capture_around_llama_cpp_python_splits_the_call_inside_its_one_process(
        testbed_engines: dict[str, Any], tmp_path: Path, model: str) -> None:
    """In process there is no server: the bench's own GenAI spans of each call give the capture its
    intervals (the interrupt, then the next call's first token), and the probes on the libllama the
    bench loaded split the call into admission, prefill and sampling, in the client process, said
    to be one process. Cross-checked against llama.cpp's own timer: its prompt-evaluation time is
    the prompt's llama_decode, which our prefill holds (with the return to Python around it)."""
    out, bench = tmp_path / "cap", tmp_path / "bench.json"
    proc = run_tracer("capture", "-o", str(out), "--force", "--", sys.executable, "-m", "ollama_tracer", "bench",
                      "interrupt", "--backend", "llama-cpp-python", "--model", model, "--iterations", "6",
                      "--interrupt-after-ms", str(INTERRUPT_MS), "--json", str(bench), timeout=600,
                      env={"OLLAMA_HOST": "127.0.0.1:9"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "one process, no server" in proc.stderr
    assert json.loads((out / "raw" / "ebpf_meta.json").read_text())["plan"]["design"] == "in-process"
    assert _providers(out) == {"llama.cpp"}
    attribution = json.loads((out / "attribution.json").read_text())
    measured = [iv for iv in attribution["intervals"] if not iv["warmup"]]
    assert [iv["kind"] for iv in measured] == ["interrupt"] * 6, attribution["intervals"]
    assert attribution["summary"]["coverage"] >= 0.95, attribution["summary"]
    own = {it["trace_id"]: it["second_stage_timings"]["prompt_eval_ms"]
           for it in json.loads(bench.read_text())["iterations"]}
    ours, theirs = [], []
    for iv in measured:
        names = [p["name"] for p in iv["phases"]]
        assert names[:3] == ["client.interrupt", "client.gap", "client.request"] and "client.first_token" in names
        ebpf = [p for p in iv["phases"] if p["source"] == "ebpf"]
        assert [p["name"] for p in ebpf] == ["runner.admit", "runner.prefill", "runner.sample"], names
        assert {p["process"] for p in ebpf} == {"client"}
        for a, b in itertools.pairwise(iv["phases"]):
            assert a["end_ns"] <= b["start_ns"] + 1_000, (a, b)  # in order, never overlapping
        ours.append(next(p["duration_ms"] for p in ebpf if p["name"] == "runner.prefill"))
        theirs.append(own[iv["trace_id"]])
    gap = statistics.median(o - t for o, t in zip(ours, theirs, strict=True))
    assert -0.5 <= gap <= max(1.5, 0.25 * statistics.median(theirs)), (ours, theirs)


def test_a_users_own_llama_cpp_python_program_is_traced_without_a_change(testbed_engines: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    """A program that calls llama_cpp.Llama itself (tests/targets/llama_cpp_app.py: streamed
    completions it leaves early, a streamed chat it leaves after one chunk, a plain completion):
    the auto-instrumentation wraps the library when the program imports it, each call is a
    llama.cpp GenAI span, and with --in-process each interrupt's next call is split by the probes.
    The program's own output is unchanged."""
    from ollama_tracer.testbed.standalone import lib_dir

    gguf = next(s["gguf"] for s in testbed_engines["llama_servers"] if s["model"] == MODELS[0])
    out = tmp_path / "cap"
    proc = run_tracer("capture", "--in-process", "-o", str(out), "--force", "--", sys.executable,
                      str(Path(REPO) / "tests" / "targets" / "llama_cpp_app.py"), gguf, "3", timeout=600,
                      env={"LLAMA_CPP_LIB_PATH": str(lib_dir()), "TARGET_LOAD_BACKENDS": "1",
                           "OLLAMA_HOST": "127.0.0.1:9"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "target: done (1 choice)" in proc.stdout
    rows = [json.loads(line) for line in (out / "raw" / "client_spans.jsonl").read_text().splitlines() if line]
    calls = [r["attributes"] for r in rows if "gen_ai.provider.name" in r.get("attributes", {})]
    assert {a["gen_ai.provider.name"] for a in calls} == {"llama.cpp"}
    assert [a["gen_ai.operation.name"] for a in calls].count("chat") == 1 and len(calls) == 8, calls
    assert sum(1 for a in calls if a.get("tracer.cancelled")) == 4  # three first stages, the chat
    attribution = json.loads((out / "attribution.json").read_text())
    assert [iv["kind"] for iv in attribution["intervals"]] == ["interrupt"] * 4, attribution["intervals"]
    assert attribution["summary"]["coverage"] >= 0.95, attribution["summary"]
    for iv in attribution["intervals"]:
        ebpf = [p["name"] for p in iv["phases"] if p["source"] == "ebpf"]
        assert ebpf == ["runner.admit", "runner.prefill", "runner.sample"], iv["phases"]


def _phase_medians(capture: Path) -> dict[str, float]:
    """Each phase's median over a capture's measured intervals, in ms."""
    summary = json.loads((capture / "attribution.json").read_text())["summary"]
    return {p["name"]: p["median_ms"] for p in summary["phases"]}


@pytest.mark.parametrize("backend", ["llama-server", "llama-cpp-python"])
def test_a_longer_prompt_lands_in_the_prefill_and_nowhere_else(testbed_engines: dict[str, Any], tmp_path: Path,
                                                               backend: str) -> None:
    """Ground truth by injected work: the same bench twice, the second call's prompt 8 times longer
    the second time. The extra prompt evaluation is prefill work, so runner.prefill (with the first
    sample) must grow by what the engine's own prompt timer says it grew (within a quarter, or
    1.5 ms), and no other phase may move by more than 1 ms or a quarter of that. Nothing in the
    attribution knows the prompt's length.

    Each prompt differs at its first token from every prompt before it, in this run or an earlier
    one: llama-server keeps earlier prompts' states in RAM (for the server's life) and would
    otherwise restore the second prompt instead of evaluating it. Found by this test: until the
    slot probe gated it, the interrupted stream's last decode (llama-server decodes for it until
    its next write fails, after the new request's handler ran) was taken for the prefill, and the
    real prefill went to client.first_token."""
    model, nonce = MODELS[1], time.time_ns()
    host = _host(testbed_engines, model)
    phases, own = {}, {}
    for label, repeat in (("short", 1), ("long", 8)):
        out, bench = tmp_path / label, tmp_path / f"{label}.json"
        where = ["--host", host, "--client", "native"] if backend == "llama-server" else []
        proc = run_tracer("capture", "-o", str(out), "--force", *(["--ollama-host", host] if where else []), "--",
                          sys.executable, "-m", "ollama_tracer", "bench", "interrupt", "--backend", backend, *where,
                          "--model", model, "--iterations", "8", "--interrupt-after-ms", str(INTERRUPT_MS),
                          "--request-timeout", "60", "--json", str(bench),
                          "--second-prompt", f"{nonce}-{{iteration}}: " + " ".join([DEFAULT_SECOND_PROMPT] * repeat),
                          timeout=600, env={"OLLAMA_HOST": "127.0.0.1:9"} if not where else None)
        assert proc.returncode == 0, proc.stderr[-2000:]
        phases[label] = _phase_medians(out)
        own[label] = statistics.median(it["second_stage_timings"]["prompt_eval_ms"]
                                       for it in json.loads(bench.read_text())["iterations"] if not it["warmup"])
    deltas = {name: round(phases["long"].get(name, 0.0) - phases["short"].get(name, 0.0), 3)
              for name in sorted(set(phases["short"]) | set(phases["long"]))}
    engine = own["long"] - own["short"]
    ours = deltas["runner.prefill"] + deltas.get("runner.sample", 0.0)
    shown = {"deltas": deltas, "engine_prompt_ms": own}  # what a failure shows
    assert engine > 3.0, shown  # the step is real: several ms of extra prompt evaluation
    assert abs(ours - engine) <= max(1.5, 0.25 * engine), shown
    for name, moved in deltas.items():
        if name not in ("runner.prefill", "runner.sample"):
            assert abs(moved) <= max(1.0, engine / 4), (name, shown)


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
