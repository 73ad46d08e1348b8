"""The symbol layer and the syscall layer on Ollama v0.34 (llama.cpp's llama-server as the runner),
against the real testbed server built from source, with real bpftrace."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from ollama_tracer.capture.directory import load_capture_meta, load_records
from ollama_tracer.collectors.ebpf_events import EbpfRecords
from ollama_tracer.collectors.ebpf_plan import plan_probes
from ollama_tracer.testbed.relay import REQUEST, RESPONSE, measure_injected_delay
from ollama_tracer.testbed.runtime import server_files, start_ollama

from tests.conftest import (
    REPO,
    attach_while_script_runs,
    check_order_and_sums,
    measured,
    phase_line,
    retry_after_stall,
    run_tracer,
    v034_server,
)
from tests.integration.test_proxy import curl_interrupts

pytestmark = pytest.mark.integration

# What the llama-server design separates with every layer on, in critical-path order.
ROUND_TRIPS = ["server.receive", "server.decode", "server.model_lookup", "server.schedule",
               "server.runner_health", "server.handoff", "server.tokenize", "server.runner_wait",
               "runner.admit", "runner.prefill", "runner.sample", "server.stream"]


def _capture(server: dict[str, Any], out: Path, model: str, *extra: str, bench_host: str | None = None,
             iterations: int = 3) -> dict[str, Any]:
    """A capture of the interrupt bench; retried once on a fresh server if v0.34 stalled under it."""
    def attempt() -> dict[str, Any]:
        host = server["host"]  # a healed server may be on a new port
        proc = run_tracer("capture", "-o", str(out), "--force", "--ollama-host", host, *extra, "--",
                          sys.executable, "-m", "ollama_tracer", "bench", "interrupt", "--host", bench_host or host,
                          "--model", model, "--iterations", str(iterations), "--interrupt-after-ms", "300",
                          "--request-timeout", "30", timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return dict(json.loads((out / "attribution.json").read_text()))

    return dict(retry_after_stall(server, attempt))




@pytest.mark.parametrize("model", ["tracer-llama:test", "tracer-gemma3:test"])
def test_symbol_layer_on_llama_server(testbed_v034: dict[str, Any], tmp_path: Path, model: str) -> None:
    server = v034_server(testbed_v034)
    attribution = _capture(server, tmp_path / "cap", model)
    meta = json.loads((tmp_path / "cap" / "capture.json").read_text())
    ebpf = meta["collectors"]["ebpf"]
    assert ebpf["ran"] is True and ebpf["stats"]["symbol_source"] == "symtab"
    plan = json.loads((tmp_path / "cap" / "raw" / "ebpf_meta.json").read_text())["plan"]
    assert plan["design"] == "llama-server"
    attached = {entry["key"] for entry in plan["attached"].values()}
    assert {"runner_handler", "slot", "decode", "sample"} <= attached  # llama-server's shared libraries
    # the per-token functions no boundary reads are not probed: each hit costs ~23 µs on the path
    assert not attached & {"admit", "token"}, attached
    for interval in measured(attribution):
        assert interval["coverage"] >= 0.98, interval
        check_order_and_sums(interval)
        names = [p["name"] for p in interval["phases"] if p["source"] == "ebpf"]
        firsts = [name for i, name in enumerate(names) if name not in names[:i]]
        assert [n for n in firsts if n in ROUND_TRIPS] == ROUND_TRIPS, names
        assert names.count("server.runner_health") == 2  # needsReload's, and Completion's own
    # The interrupted request's teardown, off the critical path: the client's EOF until llama-server
    # reads EOF on that request's own /completion connection.
    cancels = [p for iv in measured(attribution) for p in iv.get("off_critical_path", [])
               if p["name"] == "server.cancel"]
    assert len(cancels) >= len(measured(attribution)) - 1, [iv.get("off_critical_path") for iv in measured(attribution)]
    assert all(p["attributes"]["end"].startswith("llama-server saw the request's /completion") for p in cancels)
    # v0.34 keeps model metadata in a sidecar: no warm request opens the model's GGUF blob.
    scans = meta["evidence"]["gguf_scans_per_request"]
    assert scans and all(s["blob_opens"] == 0 for s in scans), scans
    assert "gguf_metadata_scans" not in {f["cause"] for f in attribution["diagnosis"]}


def test_syscall_layer_alone_on_llama_server(testbed_v034: dict[str, Any], tmp_path: Path) -> None:
    server = v034_server(testbed_v034)
    attribution = _capture(server, tmp_path / "cap", "tracer-llama:test", "--ebpf-layers", "syscall")
    for interval in measured(attribution):
        assert interval["coverage"] >= 0.85, interval
        check_order_and_sums(interval)
        names = {p["name"] for p in interval["phases"] if p["source"] == "ebpf"}
        # Each round trip to llama-server is its own connection, so the wire alone separates it.
        assert {"server.runner_health", "server.tokenize"} <= names, names


def test_the_stripped_release_build_keeps_every_probe(testbed_v034: dict[str, Any]) -> None:
    """Go functions from .gopclntab, llama-server's from its libraries' .dynsym: the same plan."""
    server = v034_server(testbed_v034)
    binary = Path(server["binary"])
    stripped = binary.with_name("ollama-stripped") if binary.name == "ollama" else binary
    with_symbols = plan_probes(stripped.with_name("ollama"), "0.34.4")
    release = plan_probes(stripped, "0.34.4")
    assert release.symbol_source == "gopclntab" and with_symbols.symbol_source == "symtab"
    assert set(release.attached) == set(with_symbols.attached) and len(release.attached) >= 20
    assert release.targets == with_symbols.targets  # the libraries are the same files


@pytest.mark.stripped
@pytest.mark.parametrize("model", ["tracer-llama:test", "tracer-gemma3:test"])
def test_every_layer_on_the_stripped_release_build(second_v034: dict[str, Any], tmp_path: Path, model: str) -> None:
    """What most users run: a release binary without symbols. The Go probes come from .gopclntab,
    llama-server's from its libraries' .dynsym: the same phases, the same coverage."""
    attribution = _capture(second_v034, tmp_path / "cap", model)
    ebpf = json.loads((tmp_path / "cap" / "capture.json").read_text())["collectors"]["ebpf"]
    assert ebpf["stats"]["symbol_source"] == "gopclntab" and not ebpf["stats"]["probes_missing"], ebpf
    for interval in measured(attribution):
        assert interval["coverage"] >= 0.98, interval
        check_order_and_sums(interval)
        names = [p["name"] for p in interval["phases"] if p["source"] == "ebpf"]
        assert [n for i, n in enumerate(names) if n not in names[:i] and n in ROUND_TRIPS] == ROUND_TRIPS, names


@pytest.mark.parametrize(("direction", "phase"), [(REQUEST, "server.receive"), (RESPONSE, "server.stream")])
def test_an_injected_delay_lands_in_the_right_phase_on_llama_server(testbed_v034: dict[str, Any], tmp_path: Path,
                                                                   direction: str, phase: str) -> None:
    """Ground truth on v0.34: 40 ms held on the request's way in grows server.receive, on the first
    token's way back server.stream, by what the relay really added."""
    server = v034_server(testbed_v034)

    def capture(out: Path, bench_host: str) -> dict[str, Any]:
        return _capture(server, out, "tracer-llama:test", bench_host=bench_host, iterations=5)

    case = measure_injected_delay(capture, int(server["host"].rsplit(":", 1)[1]), tmp_path, phase=phase,
                                  direction=direction)
    assert case.held_ms >= 40.0
    assert abs(case.error_ms) <= case.bound_ms, case


@pytest.fixture
def second_v034(testbed_v034: dict[str, Any], tmp_path: Path,
                request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Another v0.34 server on the same models (same binary, so the same comm `ollama`), with the
    OLLAMA_* settings of the test's ``settings`` marker."""
    server = v034_server(testbed_v034)
    marker = request.node.get_closest_marker("settings")
    _log, models_dir = server_files(Path(server["log"]).parent, server["version"])
    binary = Path(server["binary"])
    if request.node.get_closest_marker("stripped"):  # the release-style (-s -w) build beside it
        binary = binary.with_name("ollama-stripped")
    running: list[Any] = []

    def start() -> dict[str, Any]:
        """(Re)start it: after the interrupt stall, retry_after_stall heals this server, not the testbed's."""
        for old in running:
            old.stop()
        running.clear()
        managed, host = start_ollama(binary, Path(server["log"]).parent, lambda _m: None,
                                     log=tmp_path / "ollama-second.log", models_dir=models_dir,
                                     settings=dict(marker.args[0]) if marker else None)
        running.append(managed)
        return {"host": host, "pid": managed.pid}

    try:
        yield {"version": server["version"], **start(), "models": server["models"],
               "log": str(tmp_path / "ollama-second.log"), "restart": start}
    finally:
        for managed in running:
            managed.stop()


def test_attach_on_llama_server(testbed_v034: dict[str, Any], second_v034: dict[str, Any], tmp_path: Path) -> None:
    """An unmodified script's interrupts, found from the server side alone (eBPF), on v0.34, while
    a second v0.34 server beside it (the same comm, `ollama`) serves traffic that must not count."""
    out, server, other = tmp_path / "attach", v034_server(testbed_v034), second_v034

    def attempt() -> None:
        with traffic(other["host"]) as answered:
            code, stderr = attach_while_script_runs(server["host"], out)
        assert code == 0, stderr
        assert answered, "the other server answered nothing while attach ran"

    retry_after_stall(server, attempt)
    attribution = json.loads((out / "attribution.json").read_text())
    # The script's three interrupts, and none of the other server's requests.
    interrupts = [iv for iv in attribution["intervals"] if iv["kind"] == "interrupt"]
    assert len(interrupts) == len(attribution["intervals"]) == 3, [
        (iv["kind"], iv["duration_ms"]) for iv in attribution["intervals"]]
    for interval in interrupts:
        check_order_and_sums(interval)
        names = {p["name"] for p in interval["phases"]}
        assert {"server.model_lookup", "server.runner_health", "runner.prefill"} <= names, names
    assert attribution["ebpf_matching"]["unmatched"] == []
    roles = json.loads((out / "raw" / "ebpf_meta.json").read_text())["roles"]
    assert roles.get(str(other["pid"])) == "other", roles
    assert list(roles.values()).count("server") == 1, roles


@pytest.mark.settings({"OLLAMA_NUM_PARALLEL": "2", "OLLAMA_MAX_LOADED_MODELS": "2"})
def test_overlapping_requests_on_llama_server(second_v034: dict[str, Any], tmp_path: Path) -> None:
    """Three clients interrupting at once, two slots per llama-server: every interrupt is either
    matched to its own server events or counted as unmatched with the broken link named; none is
    attributed from another request's events."""
    out = tmp_path / "cap"
    target = str(Path(REPO) / "tests" / "targets" / "concurrent_interrupts.py")

    def attempt() -> None:
        proc = run_tracer("capture", "-o", str(out), "--force", "--ollama-host", second_v034["host"],
                          "--profile-hz", "0", "--pyspy-rate", "0", "--", sys.executable, target,
                          "tracer-llama:test,tracer-llama:test,tracer-gemma3:test",
                          env={"TARGET_ROUNDS": "3", "TARGET_TIMEOUT_S": "30"}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    retry_after_stall(second_v034, attempt)
    attribution = json.loads((out / "attribution.json").read_text())
    interrupts = [iv for iv in attribution["intervals"] if iv["kind"] == "interrupt"]
    assert len(interrupts) == 9, [(iv["kind"], iv["model"]) for iv in attribution["intervals"]]
    matching = attribution["ebpf_matching"]
    unmatched = {entry["interval"]: entry for entry in matching["unmatched"]}
    assert matching["matched"] + len(unmatched) >= len(interrupts), matching
    assert unmatched, "the barrier makes requests overlap: some cannot be followed on this design yet"
    for interval in interrupts:
        check_order_and_sums(interval)
        server_phases = [p for p in interval["phases"] if p["source"] == "ebpf"]
        if interval["index"] in unmatched:
            entry = unmatched[interval["index"]]
            assert entry["reason"] and entry["concurrent_requests"] > 0, entry
            assert server_phases == [], interval  # nothing borrowed from another request's events
        else:
            assert server_phases and interval["coverage"] >= 0.9, interval


@contextmanager
def traffic(host: str) -> Iterator[list[int]]:
    """Small generates against ``host`` every 50 ms until the block ends; yields the answered count."""
    answered: list[int] = []
    done = threading.Event()

    def loop() -> None:
        while not done.wait(0.05):
            try:
                response = requests.post(f"{host}/api/generate", timeout=20, json={
                    "model": "tracer-llama:test", "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
                if response.status_code == 200:
                    answered.append(1)
            except requests.RequestException:
                pass

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield answered
    finally:
        done.set()
        thread.join(timeout=30)


def test_curl_through_the_proxy_on_llama_server(testbed_v034: dict[str, Any], tmp_path: Path) -> None:
    out, server = tmp_path / "proxy", v034_server(testbed_v034)

    def attempt() -> None:
        answered, code, _stdout, stderr = curl_interrupts(server["host"], out)
        assert answered and code == 0, stderr

    retry_after_stall(server, attempt)
    attribution = json.loads((out / "attribution.json").read_text())
    interrupts = [iv for iv in attribution["intervals"] if iv["kind"] == "interrupt"]
    assert len(interrupts) == 3, [iv["kind"] for iv in attribution["intervals"]]
    names = {p["name"] for iv in interrupts for p in iv["phases"]}
    assert {"proxy.request", "proxy.first_token", "server.tokenize", "runner.prefill"} <= names, names
    assert all(iv["coverage"] > 0.9 for iv in interrupts)


@pytest.mark.parametrize("version", ["0.13.5", "0.34.4"])
def test_a_cold_start_inside_the_interrupt_interval(testbed_v034: dict[str, Any], tmp_path: Path,
                                                    version: str) -> None:
    """Ground truth: a request with keep_alive 0 unloads its model when interrupted, so the next
    request starts a runner from scratch. That time is server.model_load (named expired: the
    previous runner of the model exited), with the diagnosis naming it, on both designs (v0.34:
    load, startLlamaServer and WaitUntilRunning's health polls before useLoadedRunner)."""
    server = next(s for s in testbed_v034["servers"] if s["version"] == version)
    out = tmp_path / "cap"
    target = str(Path(REPO) / "tests" / "targets" / "cold_then_interrupt.py")

    said: list[str] = []

    def attempt() -> None:
        proc = run_tracer("capture", "-o", str(out), "--force", "--ollama-host", server["host"], "--",
                          sys.executable, target, "tracer-llama:test",
                          env={"OLLAMA_HOST": server["host"], "TARGET_TIMEOUT_S": "60", "TARGET_ITERATIONS": "3"},
                          timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        said[:] = [line for line in proc.stderr.splitlines() if line.startswith("target:")]

    retry_after_stall(server, attempt)
    attribution = json.loads((out / "attribution.json").read_text())
    interrupts = [iv for iv in attribution["intervals"] if iv["kind"] == "interrupt"]
    assert len(interrupts) == 3, [(iv["kind"], iv["duration_ms"]) for iv in attribution["intervals"]]
    # The ground truth, independent of the attribution: a runner process first seen inside the
    # interval was started for it. (keep_alive 0 unloads when the interrupted request ends; a next
    # request that arrives first still finds the runner loaded, so not every interval has a load.)
    ebpf = load_records(out, load_capture_meta(out)).get(EbpfRecords)
    assert ebpf is not None
    first_seen: dict[int, int] = {}
    for event in ebpf.events:  # the earliest event of each pid (stack samples come in per flush)
        first_seen[event.pid] = min(first_seen.get(event.pid, event.time_ns), event.time_ns)
    started = {pid: t for pid, t in first_seen.items() if ebpf.roles.get(pid) == "runner"}
    # a runner's opens of the model's blob: it reading the weights, the heart of its start-up
    blob_opens = {pid: [e.time_ns for e in ebpf.events if e.pid == pid and e.kind == "O" and "/blobs/sha256-" in e.text]
                  for pid in started}
    loaded = 0
    for interval in interrupts:
        check_order_and_sums(interval)
        assert interval["coverage"] >= 0.98, interval
        loads = [p for p in interval["phases"] if p["name"].startswith("server.model_load")]
        new = [pid for pid, t in started.items() if interval["start_ns"] <= t <= interval["end_ns"]]
        if not new:
            assert loads == [], interval["phases"]  # no runner started: no load reported
            continue
        loaded += 1
        why = f"{phase_line(interval)}; runners first seen at " \
              f"{[(pid, (t - interval['start_ns']) / 1e6) for pid, t in started.items()]} ms from the interval's " \
              f"start; the target said {said}"
        # keep_alive 0 ended the model's previous runner: the load is named for that, with both pids
        assert len(loads) == 1 and len(new) == 1, why
        load, pid = loads[0], new[0]
        assert load["attributes"]["reason"].startswith("expired: this model's runner (pid "), why
        assert load["attributes"]["runner_pid"] == pid != load["attributes"]["previous_runner_pid"], why
        # The runner's start-up, from its first event to its last open of the model's blob in the
        # interval, lies inside the load phase, so no other phase holds any of it. (How long the
        # phase is beyond that is Ollama's own doing: v0.13's WaitUntilRunning polls every 250 ms,
        # so a runner ready at the first poll makes a load of tens of ms, and one a moment later
        # about 300 ms. A test that asked for 100 ms asserted on that chance, and failed in CI.)
        opens = [t for t in blob_opens[pid] if t <= interval["end_ns"]]
        assert opens, why
        assert load["start_ns"] <= started[pid] and max(opens) <= load["end_ns"], \
            f"{why}; the runner's blob opens at {[(t - interval['start_ns']) / 1e6 for t in opens]} ms"
    assert loaded >= 1, "keep_alive 0 never unloaded the model before the next request"
    if 2 * loaded >= len(interrupts):  # the rule's own bar: a cause in at least half the intervals
        assert "model_expired" in {f["cause"] for f in attribution["diagnosis"]}
