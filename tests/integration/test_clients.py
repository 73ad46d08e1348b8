"""Any client, any endpoint: unmodified scripts in other clients and languages, each under
`tracer capture` and through `tracer proxy`, on both Ollama versions.

Every script interrupts a stream three times and asks again (tests/targets). Each run must give
exactly three interrupt intervals (none counted twice: every request the server read is either a
client span's or an interval of its own), whose phases sum exactly, with server and runner
phases; a client we instrument has its own client phases, one we cannot (node, curl) has none,
and says so (``seen_from: server``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, check_order_and_sums, retry_after_stall, run_tracer
from tests.integration.test_proxy import proxy

pytestmark = pytest.mark.integration
MODEL = "tracer-llama:test"
ITERATIONS = 3
VERSIONS = ("0.13.5", "0.34.4")
TARGETS = Path(REPO) / "tests" / "targets"
NODE = TARGETS / "node"

# client → (command, what the capture sees it as: "client" = its own spans, "server" = eBPF only)
CLIENTS: dict[str, tuple[list[str], str]] = {
    "openai-sdk": ([sys.executable, str(TARGETS / "openai_interrupt.py"), MODEL], "client"),
    "httpx": ([sys.executable, str(TARGETS / "httpx_generate.py"), MODEL], "client"),
    "requests-v1": ([sys.executable, str(TARGETS / "requests_openai.py"), MODEL], "client"),
    "langchain": ([sys.executable, str(TARGETS / "langchain_interrupt.py"), MODEL], "client"),
    "node-ollama": (["node", str(NODE / "interrupt.mjs"), MODEL], "server"),
    "curl-api": (["bash", str(TARGETS / "curl_interrupt.sh"), "api", MODEL], "server"),
    "curl-v1": (["bash", str(TARGETS / "curl_interrupt.sh"), "openai", MODEL], "server"),
}


def _server(testbed_v034: dict[str, Any], version: str) -> dict[str, Any]:
    return dict(next(s for s in testbed_v034["servers"] if s["version"] == version))


def _env(host: str) -> dict[str, str]:
    return {"OLLAMA_HOST": host, "TARGET_ITERATIONS": str(ITERATIONS), "TARGET_TIMEOUT_S": "30"}


def _captured(server: dict[str, Any], command: list[str], out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    proc = run_tracer("capture", "-o", str(out), "--force", "--ollama-host", server["host"], "--", *command,
                      env=_env(server["host"]), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "interrupt → first token" in proc.stdout, proc.stdout[-2000:]
    return dict(json.loads((out / "attribution.json").read_text()))


def _proxied(server: dict[str, Any], command: list[str], out: Path) -> dict[str, Any]:
    import subprocess

    shutil.rmtree(out, ignore_errors=True)
    with proxy(server["host"], out) as running:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TRACER_"))}
        script = subprocess.run(command, env={**env, **_env(running.url)}, capture_output=True, text=True,
                                timeout=300, check=False)
        code, _stdout, stderr = running.stop()
    assert script.returncode == 0, script.stderr[-2000:]
    assert code == 0, stderr[-2000:]
    return dict(json.loads((out / "attribution.json").read_text()))


# On /v1 the SSE chunks carry no created_at or durations, so nothing fills the bytes in flight:
# the request between the client's write and the server's read, the first chunk between the
# server's write and the client. They stay unattributed, not guessed; how long they are is the
# machine's: 2-26 % of a 20-30 ms interval on a quiet one, 44 % (18.7 ms of a 47 ms interval,
# the proxy waiting for a CPU) beside stress-ng. So what is checked is where the unattributed time
# lies: only in those two stretches. On /api the response source fills them (100 % in every run).
# Filling them from eBPF is issue 15's open item.
OPENAI_CLIENTS = {"openai-sdk", "requests-v1", "curl-v1"}
IN_FLIGHT = "in flight"  # min_coverage: every unattributed moment is a byte in flight


def _in_flight_ms(iv: dict[str, Any]) -> float:
    """The two stretches no source of a /v1 interval covers: the client's (or proxy's) request
    written → the server's first phase, the server's last phase → the first chunk at the client."""
    served = [p for p in iv["phases"] if p["process"] in ("server", "runner")]
    written = [p["end_ns"] for p in iv["phases"] if p["name"] in ("client.request", "proxy.request")]
    arrived = [p["start_ns"] for p in iv["phases"] if p["name"] in ("client.first_token", "proxy.first_token")]
    if not served:
        return 0.0
    before = max(0, min(p["start_ns"] for p in served) - max(written)) if written else 0
    after = max(0, min(arrived) - max(p["end_ns"] for p in served)) if arrived else 0
    return (before + after) / 1e6


def _requests_seen(out: Path, attribution: dict[str, Any]) -> str:
    """What a failure needs to tell a missed request from a miscount: the server's request reads
    and connection events as eBPF printed them, the client spans' times, and the events lost."""
    raw = out / "raw"
    meta = json.loads((raw / "ebpf_meta.json").read_text()) if (raw / "ebpf_meta.json").exists() else {}
    server = str(meta.get("pid", ""))
    events = raw / "ebpf_events.txt"
    lines = events.read_text(errors="replace").splitlines() if events.exists() else []
    reads = [line for line in lines if line.split(" ")[:1] in (["A"], ["C"], ["X"], ["R"])
             and line.split(" ")[2:3] == [server] and (not line.startswith("R") or "POST" in line or "GET" in line)]
    spans = [json.loads(line) for line in (raw / "client_spans.jsonl").read_text().splitlines() if line.strip()] \
        if (raw / "client_spans.jsonl").exists() else []
    clients = [(s.get("name"), s.get("startTimeUnixNano"), s.get("endTimeUnixNano"),
                s.get("attributes", {}).get("tracer.local_port")) for s in spans
               if s.get("attributes", {}).get("gen_ai.provider.name")]
    return json.dumps({"server_requests": attribution.get("server_requests"),
                       "lost": meta.get("bpftrace_lost_events"),
                       "matching": attribution.get("ebpf_matching", {}).get("unmatched"),
                       "client_requests": clients, "server_events": sorted(reads, key=lambda x: int(x.split(" ")[1]))},
                      default=str)[:12000]


def _check(attribution: dict[str, Any], out: Path, seen_from: str, min_coverage: float | str = 0.9) -> None:
    intervals = attribution["intervals"]
    assert [iv["kind"] for iv in intervals] == ["interrupt"] * ITERATIONS, [
        (iv["kind"], iv.get("seen_from")) for iv in intervals]
    seen = attribution["server_requests"]
    # Every request the server read is accounted for exactly once: a client's, or the server's own.
    assert seen["seen"] == 2 * ITERATIONS, _requests_seen(out, attribution)
    assert seen.get("matched_by_port", 0) + seen.get("matched_by_time", 0) + seen["server_only"] == seen["seen"], seen
    assert seen["server_only"] == (2 * ITERATIONS if seen_from == "server" else 0), seen
    for iv in intervals:
        check_order_and_sums(iv)
        assert iv["seen_from"] == seen_from, iv["seen_from"]
        processes = {p["process"] for p in iv["phases"]}
        assert {"server", "runner"} <= processes, [p["name"] for p in iv["phases"]]
        client_side = [p["name"] for p in iv["phases"] if p["process"] in ("client", "proxy")]
        if seen_from == "server":
            assert not client_side, client_side  # absent, not invented
        if min_coverage == IN_FLIGHT:
            assert iv["unattributed_ms"] <= _in_flight_ms(iv) + 0.5, (iv["unattributed_ms"], _in_flight_ms(iv), [
                (p["name"], p["start_ns"], p["end_ns"]) for p in iv["phases"]])
        else:
            assert iv["coverage"] > min_coverage, (iv["coverage"], [p["name"] for p in iv["phases"]])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_a_client_under_capture(testbed_v034: dict[str, Any], tmp_path: Path, client: str, version: str) -> None:
    command, seen_from = CLIENTS[client]
    if command[0] == "node" and not (NODE / "node_modules" / "ollama").exists():
        pytest.skip("the npm ollama package is not installed (scripts/bootstrap.sh installs it with npm)")
    server = _server(testbed_v034, version)
    attribution = retry_after_stall(server, lambda: _captured(server, command, tmp_path / "capture"))
    _check(attribution, tmp_path / "capture", seen_from, IN_FLIGHT if client in OPENAI_CLIENTS else 0.9)
    if seen_from == "client":
        names = {p["name"] for iv in attribution["intervals"] for p in iv["phases"]}
        assert {"client.request", "client.first_token"} <= names, names


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_a_client_through_the_proxy(testbed_v034: dict[str, Any], tmp_path: Path, client: str, version: str) -> None:
    """Through the proxy every client is seen by the proxy's own spans (proxy.* phases)."""
    command, _ = CLIENTS[client]
    if command[0] == "node" and not (NODE / "node_modules" / "ollama").exists():
        pytest.skip("the npm ollama package is not installed (scripts/bootstrap.sh installs it with npm)")
    server = _server(testbed_v034, version)
    attribution = retry_after_stall(server, lambda: _proxied(server, command, tmp_path / "proxy"))
    _check(attribution, tmp_path / "proxy", "client", IN_FLIGHT if client in OPENAI_CLIENTS else 0.9)
    # The proxy knows its end of every upstream connection, a reused one's too: none by time alone.
    assert attribution["server_requests"]["matched_by_time"] == 0, attribution["server_requests"]
    names = {p["name"] for iv in attribution["intervals"] for p in iv["phases"]}
    assert {"proxy.request", "proxy.first_token"} <= names, names


@pytest.mark.parametrize("version", VERSIONS)
def test_a_request_sent_while_the_previous_response_streams_is_seen(testbed_v034: dict[str, Any], tmp_path: Path,
                                                                     version: str) -> None:
    """Two requests on one keep-alive connection, the second written while the first streams: Go's
    server takes its first byte in a background read and the rest later. Both are requests the
    server read (a proxy's or a pool's reused connection hits this by chance; CI once saw 5 of 6)."""
    server = _server(testbed_v034, version)
    out = tmp_path / "capture"
    proc = run_tracer("capture", "-o", str(out), "--force", "--ollama-host", server["host"], "--",
                      sys.executable, str(TARGETS / "keepalive_next.py"), MODEL, env=_env(server["host"]), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    attribution = json.loads((out / "attribution.json").read_text())
    assert attribution["server_requests"] == {"seen": 2, "matched_by_port": 0, "matched_by_time": 0,
                                              "server_only": 2}, _requests_seen(out, attribution)
